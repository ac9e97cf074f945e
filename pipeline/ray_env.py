"""Join a Ray cluster or start an embedded one (with its dashboard on 127.0.0.1 for the long stages)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline import logs

log = logging.getLogger(__name__)

# Set before Ray starts so that every worker inherits them: no usage reports, no hub downloads by accident in tests.
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray Train's controller polls its workers this often (Ray's default: 2 s). Each poll it waits out adds to a run's
# start and end: measured here, a 2-step run took 17.9 s at 2 s and 13.1 s at 0.25 s.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@dataclass(frozen=True)
class RaySession:
    """How this process reached Ray: ``joined`` a running cluster or started an ``embedded`` one, and the URL of
    the Ray dashboard when there is one (an embedded dashboard lives as long as this process)."""

    mode: str
    dashboard_url: str | None = None


_session: dict[str, RaySession] = {}


def current_session() -> RaySession | None:
    return _session.get("current")


def _url(address: str | None) -> str | None:
    if not address:
        return None
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def want_dashboard(setting, long_stage: bool) -> bool:
    """``ray.include_dashboard``: true / false, or ``auto`` = on for the long stages (data, training, serve, demo)."""
    if isinstance(setting, str):
        value = setting.strip().lower()
        if value == "auto":
            return long_stage
        if value in ("true", "false"):
            return value == "true"
        raise ValueError(f"ray.include_dashboard must be auto, true or false, got {setting!r}")
    return bool(setting) if setting is not None else long_stage


def _start_embedded(ray, ray_cfg, dashboard: bool):
    return ray.init(
        address="local",
        num_cpus=ray_cfg.get("num_cpus"),
        num_gpus=ray_cfg.get("num_gpus"),
        include_dashboard=dashboard,
        dashboard_host=ray_cfg.get("dashboard_host", "127.0.0.1"),
        dashboard_port=ray_cfg.get("dashboard_port") or None,
    )


def _token_hint() -> str:
    # Ray ≥ 2.52 protects a local cluster with a token by default; its dashboard asks for it.
    return "; sign-in token: `ray get-auth-token`" if os.environ.get("RAY_AUTH_MODE") == "token" else ""


def init_ray(ray_cfg, long_stage: bool = False) -> RaySession:
    """Join ``ray.address`` or ``$RAY_ADDRESS`` (set by `ray job submit`), else start a local Ray on 127.0.0.1,
    with its dashboard when ``ray.include_dashboard`` asks for it (``auto``: for a ``long_stage``). A dashboard that
    cannot start (missing packages, no free port) is reported in one line and Ray starts without it."""
    import ray

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        session = current_session() or RaySession("joined")
    else:
        session = _connect(ray, ray_cfg, long_stage)
    _session["current"] = session
    logs.configure_ray_data_output(float(ray_cfg.get("progress_interval_s", 30) or 30))
    return session


def _connect(ray, ray_cfg, long_stage: bool) -> RaySession:
    address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        context = ray.init(address=address)
        return RaySession("joined", _url(getattr(context, "dashboard_url", None)))
    dashboard = want_dashboard(ray_cfg.get("include_dashboard", "auto"), long_stage)
    poll = ray_cfg.get("train_poll_interval_s")
    if poll is not None:  # an explicit environment variable wins; the embedded Ray's workers inherit this one
        os.environ.setdefault(TRAIN_POLL_ENV, str(float(poll)))
    log.info("starting an embedded local Ray%s", " with its dashboard" if dashboard else "")
    try:
        context = _start_embedded(ray, ray_cfg, dashboard)
    except Exception as exc:  # noqa: BLE001 - any dashboard failure: run without it, as the docstring says
        if not dashboard:
            raise
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__).rstrip(":")
        log.warning("Ray could not start with its dashboard (%s); starting it without the dashboard", reason)
        if ray.is_initialized():
            ray.shutdown()
        context = _start_embedded(ray, ray_cfg, False)
        dashboard = False
    url = _url(getattr(context, "dashboard_url", None)) if dashboard else None
    if dashboard and not url:
        log.warning("the Ray dashboard did not start; running without it")
    if url:
        log.info("Ray dashboard: %s (while this command runs%s)", url, _token_hint())
    return RaySession("embedded", url)
