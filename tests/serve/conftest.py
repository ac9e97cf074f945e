"""One Serve app for the whole tests/serve package (starting Serve and loading models costs tens of seconds on 2
cores), on a free loopback port, shut down when the package is done so later tests get Ray's CPUs back."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from tests.ports import free_port

SERVE_DEFAULTS = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf", "serve", "default.yaml")
APP_NAME = "sdxl-test"


def serve_config(root: str, port: int, **serve_overrides):
    """The repo's serve section (conf/serve/default.yaml) with small CPU shares, for the tiny preset."""
    serve = OmegaConf.load(SERVE_DEFAULTS)
    cfg = OmegaConf.create({"serve": serve, "model": {"preset": "tiny"}, "train": {"seed": 0}, "paths": {"root": root},
                            "mlflow": {"tracking_uri": None}})
    cfg.serve.port = port
    cfg.serve.app_name = APP_NAME
    cfg.serve.blocking = False
    cfg.serve.startup_timeout_s = 240
    cfg.serve.torch_threads = 1
    for name in ("ingress", "text_encoder", "base", "refiner", "decoder"):
        cfg.serve.deployments[name].ray_actor_options = {"num_cpus": 0.05}
    for key, value in serve_overrides.items():
        OmegaConf.update(cfg, f"serve.{key}", value, merge=False)
    return cfg


@pytest.fixture(scope="package")
def serve_app(ray_local, tmp_path_factory):
    """{"url", "cfg", "handle"(name) -> DeploymentHandle} of the running test app."""
    from ray import serve

    from pipeline.context import StageContext
    from stages.serve.app import run

    root = str(tmp_path_factory.mktemp("serve-root"))
    cfg = serve_config(root, free_port(),
                       **{"batching.max_batch_size": 4, "batching.batch_wait_timeout_s": 0.5,
                          "max_queued_requests": 4, "deployments.ingress.max_ongoing_requests": 8,
                          "request_defaults.width": 32, "request_defaults.height": 32, "request_defaults.steps": 2})
    # stage=serve's own entry point, non-blocking: it returns once /health answers 200.
    summary = run(cfg, StageContext(root=root, stage="serve"))
    url = summary["url"]
    assert summary["app"] == APP_NAME and summary["preset"] == "tiny"
    yield {"url": url, "cfg": cfg,
           "handle": lambda name: serve.get_deployment_handle(name, app_name=APP_NAME)}
    serve.shutdown()
