"""The Serve app over real HTTP on 127.0.0.1 with the tiny preset: health, single/multi image, refiner modes,
non-square sizes, determinism per seed, and equality with the model core called in-process."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from sdxl.sampling import SAMPLERS

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

TIMEOUT = 120


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/generate", json=body, timeout=TIMEOUT)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_health_answers_200_with_every_deployment_loaded(serve_app):
    resp = requests.get(f"{serve_app['url']}/health", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "deployments": {"text_encoder": True, "base_sampler": True,
                                                            "refiner": True, "decoder": True}}


def test_single_image_is_a_png_of_the_requested_non_square_size(serve_app):
    resp = post(serve_app["url"], {"prompt": "a red square", "width": 48, "height": 80, "steps": 2, "seed": 5})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(resp.content))
    assert image.format == "PNG" and image.size == (48, 80)  # PIL: (width, height)
    params = json.loads(resp.headers["X-Generation-Params"])
    assert (params["seed"], params["width"], params["height"], params["steps"]) == (5, 48, 80, 2)
    assert set(json.loads(resp.headers["X-Timings"])) >= {"text_encoder_s", "base_s", "decode_s", "total_s"}


def test_several_images_come_as_json_with_parameters_and_timings(serve_app):
    resp = post(serve_app["url"], {"prompt": "two cats", "num_images": 2, "seed": 11, "format": "jpeg",
                                   "width": 64, "height": 32, "steps": 2})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["media_type"] == "image/jpeg" and len(out["images"]) == 2
    for b64 in out["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.format == "JPEG" and image.size == (64, 32)
    params = out["parameters"]
    assert params["seeds"] == [11, 12] and params["sampler"] == "euler" and params["steps"] == 2
    assert params["refiner"] is False and out["timings"]["total_s"] > 0


def test_image_k_of_a_request_equals_its_seed_alone(serve_app):
    url = serve_app["url"]
    pair = post(url, {"prompt": "a boat", "num_images": 2, "seed": 20, "steps": 2}).json()
    second = post(url, {"prompt": "a boat", "seed": 21, "steps": 2})
    diff = np.abs(decode(base64.b64decode(pair["images"][1])).astype(int) - decode(second.content).astype(int))
    assert diff.max() <= 1  # same noise and weights; batch composition may move a float by an ulp


@pytest.mark.parametrize("refiner", [{"refiner_strength": 0.5}, {"high_noise_frac": 0.5}])
def test_refiner_modes_produce_images(serve_app, refiner):
    body = {"prompt": "a lighthouse", "width": 32, "height": 48, "steps": 4, "seed": 3, "refiner": True, **refiner}
    resp = post(serve_app["url"], body)
    assert resp.status_code == 200, resp.text
    assert Image.open(io.BytesIO(resp.content)).size == (32, 48)
    params = json.loads(resp.headers["X-Generation-Params"])
    assert params["refiner"] is True
    assert params["refiner_mode"] == ("sdedit" if "refiner_strength" in refiner else "ensemble")
    plain = post(serve_app["url"], {**body, "refiner": False})
    assert plain.content != resp.content  # the refiner changed the latents


def test_same_seed_same_image_other_seed_other_image(serve_app):
    url = serve_app["url"]
    body = {"prompt": "a forest at dawn", "steps": 2, "seed": 42}
    first, again, other = post(url, body), post(url, body), post(url, {**body, "seed": 43})
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content
    assert first.content != other.content


def test_missing_seed_is_random_and_reported(serve_app):
    url = serve_app["url"]
    first = post(url, {"prompt": "a mountain", "steps": 2})
    seed = int(first.headers["X-Seed"])
    assert json.loads(first.headers["X-Generation-Params"])["seed"] == seed
    assert post(url, {"prompt": "a mountain", "steps": 2, "seed": seed}).content == first.content


def test_output_equals_the_model_core_in_process(serve_app):
    """refiner=false: the server's image is sample_base + decode_latents on the same (seeded random) weights."""
    import torch

    from sdxl.conditioner import TextConditioner
    from sdxl.models import build_components
    from sdxl.latent_scale import vae_downsample
    from sdxl.sampling import SampleParams, decode_latents, sample_base, to_pil

    body = {"prompt": "an orange cat", "negative_prompt": "blurry", "width": 40, "height": 24, "steps": 3,
            "guidance_scale": 4.0, "seed": 1234, "sampler": "ddim"}
    resp = post(serve_app["url"], body)
    assert resp.status_code == 200, resp.text

    parts = build_components("tiny", kind="base", seed=int(serve_app["cfg"].serve.seed))
    conditioner = TextConditioner.from_components(parts, kind="base")
    with torch.no_grad():
        cond, uncond = conditioner.encode_for_sampling(body["prompt"], body["negative_prompt"])
        params = SampleParams(height=24, width=40, steps=3, guidance_scale=4.0, sampler="ddim", seed=1234,
                              latent_downsample=vae_downsample(parts.vae))
        latents = sample_base(parts.unet, cond, uncond, params)
        expected = np.asarray(to_pil(decode_latents(parts.vae, latents))[0])
    served = decode(resp.content)
    assert served.shape == expected.shape == (24, 40, 3)
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_playground_and_bucket_info_are_served(serve_app):
    page = requests.get(f"{serve_app['url']}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text
    info = requests.get(f"{serve_app['url']}/buckets", timeout=TIMEOUT).json()
    assert [128, 128] in info["buckets"] and info["defaults"]["width"] == 32
    assert info["samplers"] == list(SAMPLERS)
