"""Ray Serve application: text encoders → base sampler → refiner → VAE decoder behind an HTTP ingress."""
