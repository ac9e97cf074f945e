"""SDXL model core: buckets, crops, presets, models, conditioner, diffusion and sampling (no Ray, no MLflow)."""
