"""The HTTP ingress, the application graph (:func:`build_app`) and ``stage=serve`` (:func:`run`).

Routes: ``POST /generate`` (SPEC.md "Serve"), ``GET /health`` (200 once every deployment answers, i.e. its models
are loaded), ``GET /`` (the playground page) and ``GET /buckets`` (sizes, defaults and limits for the page).

Load is bounded twice: the proxy queues at most ``serve.max_queued_requests`` requests for the ingress and each model
deployment at most as many per caller; beyond that a request gets 429 at once instead of piling up in memory.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation through serve.ingress.

import asyncio
import base64
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.serve.exceptions import BackPressureError

from sdxl.buckets import bucket_table
from sdxl.sampling import SAMPLERS
from stages.serve.deployments import BaseSampler, Decoder, Refiner, TextEncoder
from stages.serve.engine import MEDIA_TYPES, Stopwatch, encode_image
from stages.serve.loading import sources_from_config
from stages.serve.schema import (
    RequestError,
    ServeLimits,
    defaults_from_config,
    limits_from_config,
    parse_generate_request,
)

log = logging.getLogger(__name__)

PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playground.html")
_HEALTH_TIMEOUT_S = 10.0

fastapi_app = FastAPI(title="SDXL", description="SDXL base + refiner text-to-image on Ray Serve")


def _error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


@serve.deployment(name="Ingress")
@serve.ingress(fastapi_app)
class Ingress:
    """Validates requests, drives encode → base → refiner → decode through handles, encodes the images."""

    def __init__(self, text_encoder, base_sampler, refiner, decoder, settings: dict):
        self.text_encoder, self.base_sampler, self.refiner, self.decoder = text_encoder, base_sampler, refiner, decoder
        self.limits: ServeLimits = settings["limits"]
        self.defaults = settings["defaults"]
        self.ensemble = bool(settings["ensemble"])
        self.page_info = settings["page_info"]
        with open(PLAYGROUND, encoding="utf-8") as f:
            self.playground = f.read()

    @fastapi_app.get("/", response_class=HTMLResponse)
    async def playground_page(self) -> HTMLResponse:
        return HTMLResponse(self.playground)

    @fastapi_app.get("/buckets")
    async def buckets(self) -> dict:
        return self.page_info

    @fastapi_app.get("/health")
    async def health(self) -> JSONResponse:
        names = ("text_encoder", "base_sampler", "refiner", "decoder")
        handles = (self.text_encoder, self.base_sampler, self.refiner, self.decoder)

        async def probe(handle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), _HEALTH_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - any failure means "not ready"
                return False

        states = await asyncio.gather(*(probe(h) for h in handles))
        ready = dict(zip(names, states))
        status = 200 if all(states) else 503
        return JSONResponse({"status": "ok" if status == 200 else "loading", "deployments": ready},
                            status_code=status)

    @fastapi_app.post("/generate")
    async def generate(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, "body", f"body: malformed JSON ({err})")
        try:
            req = parse_generate_request(body, self.limits, self.defaults)
        except RequestError as err:
            return JSONResponse(err.to_json(), status_code=err.status)
        if req.refiner and req.refiner_mode == "ensemble" and not self.ensemble:
            return _error(422, "high_noise_frac", "high_noise_frac: the ensemble-of-experts mode is off on this "
                                                  "server (serve.refiner_ensemble=false); use refiner_strength")
        try:
            return await self._generate(req)
        except BackPressureError as err:
            return _error(429, None, f"server busy, retry later ({err})")
        except ValueError as err:
            # The samplers refuse some parameter combinations validation cannot foresee (e.g. a hand-over that
            # leaves one model no step); their message names the parameter.
            return _error(422, None, str(err).splitlines()[-1] if str(err) else type(err).__name__)
        except Exception as err:  # noqa: BLE001 - a failed request must not take the replica down
            log.exception("generation failed")
            return _error(500, None, f"generation failed: {type(err).__name__}: {str(err)[:500]}")

    async def _generate(self, req) -> Response:
        watch = Stopwatch()
        encoded = await self.text_encoder.encode.remote(req)
        watch.lap("text_encoder")
        if req.refiner and req.refiner_mode == "ensemble":
            latents = await self.refiner.refine.remote(req, encoded, None)
            watch.lap("base_and_refiner")
        else:
            latents = await self.base_sampler.sample.remote(req, encoded)
            watch.lap("base")
            if req.refiner:
                latents = await self.refiner.refine.remote(req, encoded, latents)
                watch.lap("refiner")
        images = await self.decoder.decode.remote(latents)
        watch.lap("decode")
        blobs = await asyncio.to_thread(lambda: [encode_image(image, req.format) for image in images])
        watch.lap("image_encoding")
        params, timings = req.resolved(), watch.total()
        if len(blobs) == 1:
            header = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt")}
            return Response(content=blobs[0], media_type=MEDIA_TYPES[req.format], headers={
                "X-Seed": str(req.seed),
                "X-Generation-Params": json.dumps(header, separators=(",", ":")),
                "X-Timings": json.dumps(timings, separators=(",", ":")),
            })
        return JSONResponse({
            "images": [base64.b64encode(blob).decode("ascii") for blob in blobs],
            "media_type": MEDIA_TYPES[req.format],
            "parameters": params,
            "timings": timings,
        })


# ---- building the application from config ------------------------------------------------------------------------


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def deployment_options(serve_cfg, name: str, *, batched: bool) -> dict:
    """``.options(...)`` of one deployment from ``cfg.serve.deployments.<name>`` (+ the batch and queue bounds)."""
    spec = _plain(serve_cfg.deployments.get(name))
    batch = int(serve_cfg.batching.max_batch_size)
    queued = int(serve_cfg.max_queued_requests)
    # Serve sends a replica at most max_ongoing_requests (default 5) at a time, which would cap batches at 5.
    floor = 2 * batch if batched else 1
    options = {
        "ray_actor_options": spec.get("ray_actor_options") or {"num_cpus": 1},
        "max_ongoing_requests": max(int(spec.get("max_ongoing_requests") or floor), floor),
        "max_queued_requests": queued,
    }
    if spec.get("autoscaling_config"):
        options["autoscaling_config"] = spec["autoscaling_config"]
    else:
        options["num_replicas"] = int(spec.get("num_replicas") or 1)
    return options


def ingress_settings(cfg) -> dict:
    s = cfg.serve
    table = bucket_table(int(s.resolution), int(s.bucket_multiple))
    limits = limits_from_config(s, samplers=SAMPLERS, max_pixels=max(h * w for h, w in table))
    defaults = defaults_from_config(_plain(s.get("request_defaults")))
    # Fail at start-up, not on every request, when the defaults break the limits (e.g. a full-size default width
    # with the tiny preset's pixel budget).
    try:
        parse_generate_request({"prompt": "start-up check", "seed": 0}, limits, defaults)
    except RequestError as err:
        raise ValueError(f"serve.request_defaults do not pass serve's own limits: {err.message}") from err
    fitting = [[h, w] for h, w in table if h <= limits.max_side and w <= limits.max_side and h * w <= limits.max_pixels]
    page_info = {
        "buckets": fitting,
        "defaults": {k: getattr(defaults, k) for k in defaults.__dataclass_fields__},
        "limits": {"max_side": limits.max_side, "max_pixels": limits.max_pixels, "max_steps": limits.max_steps,
                   "max_images": limits.max_images, "size_multiple": limits.size_multiple},
        "samplers": list(SAMPLERS),
        "refiner_ensemble": bool(s.refiner_ensemble),
    }
    return {"limits": limits, "defaults": defaults, "ensemble": bool(s.refiner_ensemble), "page_info": page_info}


def build_app(cfg, tracking_uri: str | None = None):
    """The Serve application graph for ``cfg`` (not started; ``serve.run(build_app(cfg))`` starts it)."""
    s = cfg.serve
    if tracking_uri is None and any(s.get(k) for k in ("model_uri", "refiner_model_uri", "vae_model_uri")):
        from pipeline.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(cfg)
    sources = sources_from_config(cfg, tracking_uri)
    batching = _plain(s.batching)
    threads = s.get("torch_threads")
    text = TextEncoder.options(**deployment_options(s, "text_encoder", batched=True)).bind(sources, batching, threads)
    base = BaseSampler.options(**deployment_options(s, "base", batched=True)).bind(sources, batching, threads)
    refiner = Refiner.options(**deployment_options(s, "refiner", batched=True)).bind(
        sources, batching, threads, bool(s.refiner_ensemble))
    decoder = Decoder.options(**deployment_options(s, "decoder", batched=True)).bind(sources, batching, threads)
    ingress_options = deployment_options(s, "ingress", batched=False)
    ingress_options["backpressure_config"] = {"status_code": 429, "retry_after_s": 1}
    return Ingress.options(**ingress_options).bind(text, base, refiner, decoder, ingress_settings(cfg))


def app_builder(args: dict):
    """Import path for ``serve run`` / ``serve deploy`` (see serve_config.yaml): ``args.overrides`` is a list of
    Hydra overrides (``preset=full``, ``serve.checkpoint=...``) applied to the pipeline's config."""
    from hydra import compose, initialize_config_dir

    overrides = list((args or {}).get("overrides") or [])
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "pipeline", "conf")
    if not any(o.startswith("paths.root=") for o in overrides):
        overrides.append(f"paths.root={os.environ.get('SDXL_ROOT', os.path.join(os.getcwd(), 'outputs'))}")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        cfg = compose(config_name="config", overrides=["stage=serve", *overrides])
    return build_app(cfg)


def wait_until_healthy(url: str, timeout_s: float) -> None:
    """Poll ``GET {url}/health`` until it answers 200; raises TimeoutError naming the last answer."""
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s}s (last: {last})")


def start(cfg, tracking_uri: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``serve.host:serve.port``, deploy the app, wait for /health; returns the URL."""
    s = cfg.serve
    logging_config = {"log_level": str(s.get("log_level", "INFO")).upper(),
                      "enable_access_log": bool(s.get("access_log", True))}
    logging.getLogger("ray.serve").setLevel(logging_config["log_level"])  # this process's own Serve lines too
    serve.start(http_options={"host": str(s.host), "port": int(s.port),
                              "request_timeout_s": float(s.request_timeout_s)}, logging_config=logging_config)
    serve.run(build_app(cfg, tracking_uri), name=str(s.app_name), route_prefix=str(s.route_prefix), blocking=False,
              logging_config=logging_config)
    url = f"http://{s.host}:{int(s.port)}{str(s.route_prefix).rstrip('/')}"
    wait_until_healthy(url, float(s.startup_timeout_s))
    return url


def run(cfg, ctx) -> dict:
    """``stage=serve``: serve on ``serve.host:serve.port``; with ``serve.blocking`` (default) until interrupted."""
    url = start(cfg, ctx.tracking_uri)
    log.info("SDXL serving at %s (playground: %s/)", url, url)
    ctx.set_tags({"serve.url": url})
    summary = {"url": url, "app": str(cfg.serve.app_name), "preset": str(cfg.serve.preset)}
    if not cfg.serve.blocking:
        return summary
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("stopping the Serve app %s", cfg.serve.app_name)
        serve.delete(str(cfg.serve.app_name))
    return summary
