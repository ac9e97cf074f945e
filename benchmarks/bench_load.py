"""The load test of benchmarks/load_serve.py as a recorded benchmark: the self-started tiny app (random weights, one
replica per deployment, 32×32 px, 2 steps) on an embedded 2-CPU Ray, ``CONCURRENCY`` clients for ``DURATION_S``.

Run: ``python benchmarks/run.py load`` (RESULTS.md § load) or ``python benchmarks/bench_load.py`` (prints).
"""

from __future__ import annotations

import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

CONCURRENCY = 2
DURATION_S = 15.0


def main() -> dict:
    from benchmarks.load_serve import DEFAULT_BODY
    from benchmarks.load_serve import main as load_test

    result = load_test(None, CONCURRENCY, DURATION_S)
    result.pop("url")
    return {"setup": f"tiny preset, random weights, {DEFAULT_BODY['width']}x{DEFAULT_BODY['height']} px, "
                     f"{DEFAULT_BODY['steps']} steps, one replica per deployment, embedded 2-CPU Ray",
            **result}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
