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


def test_generate_keeps_serves_request_lines_off_the_console_and_serve_keeps_them(monkeypatch):
    """stage=generate is a batch job: Serve starts at WARNING without access lines; stage=serve logs at INFO with one
    line per request (both from the composed stage configs, through stages.serve.app.start)."""
    import logging
    import os

    from hydra import compose, initialize_config_dir

    from stages.serve import app

    started = {}
    monkeypatch.setattr(app.serve, "start", lambda **kw: started.update(start=kw["logging_config"]))
    monkeypatch.setattr(app.serve, "run", lambda *a, **kw: started.update(run=kw["logging_config"]))
    monkeypatch.setattr(app, "build_app", lambda cfg, uri=None: "graph")
    monkeypatch.setattr(app, "wait_until_healthy", lambda url, timeout_s: None)
    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "pipeline", "conf"))
    serve_logger = logging.getLogger("ray.serve")
    before = serve_logger.level
    try:
        with initialize_config_dir(config_dir=conf, version_base=None):
            app.start(compose(config_name="config", overrides=["stage=generate", "paths.root=/tmp/unused"]))
            assert started["start"] == started["run"] == {"log_level": "WARNING", "enable_access_log": False}
            assert serve_logger.level == logging.WARNING
            app.start(compose(config_name="config", overrides=["stage=serve", "paths.root=/tmp/unused"]))
            assert started["start"] == started["run"] == {"log_level": "INFO", "enable_access_log": True}
    finally:
        serve_logger.setLevel(before)
