"""Concurrent compatible requests share batches; load beyond the queue bound gets 429, never an unbounded queue."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from stages.serve.app import deployment_options

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

TIMEOUT = 120


def _post(url: str, seed: int) -> int:
    body = {"prompt": f"request {seed}", "steps": 2, "seed": seed, "width": 32, "height": 32}
    return requests.post(f"{url}/generate", json=body, timeout=TIMEOUT).status_code


def _post_until_admitted(url: str, seed: int, tries: int = 5) -> int:
    """A client that honours 429 (the bounded queue's answer) by retrying after Retry-After, as clients should."""
    for _ in range(tries):
        code = _post(url, seed)
        if code != 429:
            return code
        time.sleep(1.0)
    return code


def test_concurrent_requests_are_batched(serve_app):
    handle = serve_app["handle"]("BaseSampler")
    handle.reset_batch_sizes.remote().result(timeout_s=TIMEOUT)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda seed: _post_until_admitted(serve_app["url"], seed), range(100, 108)))
    assert codes == [200] * 8
    assert time.monotonic() - started < TIMEOUT
    sizes = handle.batch_sizes.remote().result(timeout_s=TIMEOUT)
    assert sum(sizes) == 8 and max(sizes) > 1, sizes
    assert max(sizes) <= serve_app["cfg"].serve.batching.max_batch_size


def test_overload_gets_429_and_the_server_recovers(serve_app):
    # The test app takes 8 requests at the ingress and queues 4 more at the proxy; 40 at once must overflow.
    with ThreadPoolExecutor(max_workers=40) as pool:
        codes = list(pool.map(lambda seed: _post(serve_app["url"], seed), range(200, 240)))
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= 8
    assert _post(serve_app["url"], 999) == 200


def test_batched_deployments_accept_more_than_five_ongoing_requests(serve_app):
    options = deployment_options(serve_app["cfg"].serve, "base", batched=True)
    # Serve's default max_ongoing_requests=5 would cap every batch at 5.
    assert options["max_ongoing_requests"] >= 2 * serve_app["cfg"].serve.batching.max_batch_size
    assert options["max_queued_requests"] == serve_app["cfg"].serve.max_queued_requests
