"""stage=generate's requests: no negative prompt unless one is configured (the server then uses each model's
unconditional input); an explicit "" is sent as such."""

from omegaconf import OmegaConf

from stages.generate import request_body


def test_request_body_sends_a_negative_prompt_only_when_configured():
    gen = OmegaConf.create({"seed": 3, "refiner": True, "num_images": 2, "width": None, "height": 64, "steps": 4})
    body = request_body(gen, "a red circle", 1)
    assert body == {"prompt": "a red circle", "seed": 4, "refiner": True, "num_images": 2, "format": "png",
                    "height": 64, "steps": 4}
    assert request_body(OmegaConf.merge(gen, {"negative_prompt": ""}), "p", 0)["negative_prompt"] == ""
    assert request_body(OmegaConf.merge(gen, {"negative_prompt": "blurry"}), "p", 0)["negative_prompt"] == "blurry"
