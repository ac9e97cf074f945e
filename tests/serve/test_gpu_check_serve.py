"""benchmarks/gpu_check.py's Serve timing against the package's running app (what its CUDA path times at 1024²)."""

from __future__ import annotations

import pytest

from benchmarks.gpu_check_serve import serve_latency

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_serve_latency_times_one_request_after_a_warm_up(serve_app):
    result = serve_latency(serve_app["url"], {"prompt": "a horse", "width": 32, "height": 32, "steps": 2, "seed": 0})
    assert result["latency_s"] > 0
    timings = result["server_timings"]
    assert {"text_encoder_s", "base_s", "decode_s", "total_s"} <= set(timings)
    # The server's own total fits inside the round trip the client measured.
    assert 0 < timings["total_s"] <= result["latency_s"]


def test_serve_latency_names_a_failed_request(serve_app):
    with pytest.raises(RuntimeError, match="warm-up request failed: HTTP 4"):
        serve_latency(serve_app["url"], {"prompt": "a horse", "width": 33, "height": 32, "steps": 2})
