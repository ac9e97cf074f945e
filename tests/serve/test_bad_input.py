"""Bad requests get a 4xx naming the field, and the app keeps serving good ones afterwards."""

from __future__ import annotations

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

TIMEOUT = 120

BAD_BODIES = [
    ({"width": 32}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "p", "width": "32"}, "width"),
    ({"prompt": "p", "steps": 2.5}, "steps"),
    ({"prompt": "p", "refiner": "yes"}, "refiner"),
    ({"prompt": "p", "width": 1000}, "width"),  # a multiple of 8, but over the tiny pixel budget
    ({"prompt": "p", "width": 1001}, "width"),  # not a multiple of 8
    ({"prompt": "p", "width": 100000}, "width"),
    ({"prompt": "p", "steps": 0}, "steps"),
    ({"prompt": "p", "steps": 10000}, "steps"),
    ({"prompt": "p", "num_images": 0}, "num_images"),
    ({"prompt": "p", "num_images": 1000}, "num_images"),
    ({"prompt": "p", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "p", "sampler": "unknown_sampler"}, "sampler"),
    ({"prompt": "p", "format": "bmp"}, "format"),
    ({"prompt": "p", "original_size": [64]}, "original_size"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_invalid_field_gets_4xx_naming_it(serve_app, body, field):
    resp = requests.post(f"{serve_app['url']}/generate", json=body, timeout=TIMEOUT)
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()
    assert error["field"] == field and field in error["error"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'"just a string"', b"[1, 2]"])
def test_malformed_body_gets_400(serve_app, raw):
    resp = requests.post(f"{serve_app['url']}/generate", data=raw, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "body" in resp.json()["error"]


def test_sampler_refusal_is_a_4xx_not_a_crash(serve_app):
    # One step cannot be split between base and refiner: the sampler refuses, the client gets 422 with its reason.
    resp = requests.post(f"{serve_app['url']}/generate", timeout=TIMEOUT,
                         json={"prompt": "p", "steps": 1, "refiner": True, "high_noise_frac": 0.5, "seed": 1})
    assert resp.status_code == 422, resp.text
    assert "step" in resp.json()["error"]


def test_good_request_still_works_after_bad_ones(serve_app):
    url = serve_app["url"]
    assert requests.post(f"{url}/generate", data=b"{oops", timeout=TIMEOUT).status_code == 400
    resp = requests.post(f"{url}/generate", json={"prompt": "fine", "steps": 2, "seed": 9}, timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert requests.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
