"""What the CLI prints: a short human summary of a stage's result, and one line for an error.

The summary is generic: stages (and the people who add keys to their results) are not listed here. It shows a
stage's counts (``kept``, ``num_shards``, ``step`` ...), its headline metrics wherever they sit in the result
(FID, CLIP score, PSNR, loss, any ``*accuracy`` with its ``*chance`` level), its output folders and PNG files, one
line per sub-stage of a chained result (``{"stages": {name: result}}``), and the commands to look further.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

# Top-level counts worth a glance, in this order.
COUNT_KEYS = ("kept", "rejected", "num_shards", "images", "num_images", "samples", "encoded_files", "step")
# Result keys naming a product of the stage, in the order they are shown; any other ``*_dir`` key comes after them.
PATH_KEYS = ("url", "grid", "final_dir", "export_dir", "output_dir", "out_dir", "cache_dir", "dataset_dir")
# Metric names (the last part of a key, after an optional eval_/vae_ prefix and before a _cfg<scale> suffix).
_METRIC = re.compile(r"^(?:eval_|vae_|val_)?(fid|rfid|kid|psnr|ssim|lpips|clip_score|is|inception_score|loss"
                     r"|precision|recall)(?:_cfg[\d.]+)?$")
_CFG_SUFFIX = re.compile(r"^(.*)_cfg([\d.]+)$")
_GENERIC_LEAVES = ("accuracy", "acc", "chance", "value", "mean")
_REMOTE = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://", "file://")
MAX_METRICS = 6
MAX_PATHS = 3
LINE_WIDTH = 100


@dataclass
class Headline:
    """The parts of a result the summary shows."""

    counts: list[tuple[str, Any]] = field(default_factory=list)
    metrics: list[tuple[str, str]] = field(default_factory=list)  # (label, formatted value)
    more_metrics: int = 0
    paths: list[tuple[str, str]] = field(default_factory=list)  # (label, path)
    more_paths: int = 0
    key_image: str | None = None  # the PNG to open first


# ------------------------------------------------------------------------------------------------------- values
def format_number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _looks_like_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "./")) or value.startswith(_REMOTE)
                                       or re.match(r"^https?://", value) is not None)


# ------------------------------------------------------------------------------------------------------ walking
def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every dict leaf; lists are not entered (they repeat what dicts name), except that
    strings in lists are yielded so output files listed there are found. ``stages`` is summarised on its own."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not path and key == "stages":
                continue
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str):
                yield path, item
    else:
        yield path, node


def _leaf_name(path: tuple[str, ...]) -> str:
    """The metric's own name: the last key, after the last ``/`` (``loss/psnr`` → psnr)."""
    return path[-1].rsplit("/", 1)[-1] if path else ""


def _label(path: tuple[str, ...]) -> str:
    leaf = _leaf_name(path)
    if leaf in _GENERIC_LEAVES and len(path) > 1:
        return f"{path[-2].rsplit('/', 1)[-1]}_{leaf}"
    return leaf


def _is_accuracy(leaf: str) -> bool:
    """An accuracy-like score shown with its chance level (an AUC's is 0.5)."""
    return "accuracy" in leaf or leaf == "acc" or leaf.endswith("_auc")


def _is_metric(leaf: str) -> bool:
    return bool(_METRIC.match(leaf)) or _is_accuracy(leaf) or leaf == "chance" or leaf.endswith("_chance")


def _chance_of(path: tuple[str, ...], numbers: dict[tuple[str, ...], float]) -> tuple[str, ...] | None:
    """The key holding the chance level of an accuracy: the same path with accuracy → chance."""
    for old, new in (("accuracy", "chance"), ("acc", "chance"), ("_auc", "_chance")):
        if old in path[-1]:
            candidate = (*path[:-1], path[-1].replace(old, new))
            if candidate in numbers:
                return candidate
    return None


def _metrics(result: dict) -> tuple[list[tuple[str, str]], int]:
    numbers = {p: v for p, v in _leaves(result) if _is_number(v) and _is_metric(_leaf_name(p))}
    used: set[tuple[str, ...]] = set()
    accuracies, others = [], []
    for path, value in numbers.items():
        if _is_accuracy(_leaf_name(path)):
            chance = _chance_of(path, numbers)
            text = format_number(value) + (f" (chance {format_number(numbers[chance])})" if chance else "")
            if chance:
                used.add(chance)
            label = _label(path)
            if any(label == seen for seen, _ in accuracies) and len(path) > 1:
                label = f"{path[-2]}/{label}"  # the same accuracy of something else (e.g. the reader on real images)
            accuracies.append((label, text))
    labels = {label for label, _ in accuracies}
    for path, value in numbers.items():
        leaf, label = _leaf_name(path), _label(path)
        # The same label twice (loss and loss/loss) shows once.
        if path in used or _is_accuracy(leaf) or label in labels:
            continue
        labels.add(label)
        others.append((label, value))
    merged = accuracies + _group_guidance_scales(others)
    return merged[:MAX_METRICS], max(0, len(merged) - MAX_METRICS)


def _group_guidance_scales(items: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    """``fid_cfg1.5, fid_cfg3 ...`` → one entry ``fid (cfg 1.5/3)`` with the values in the same order."""
    grouped: dict[str, list[tuple[str, Any]]] = {}  # in first-seen order
    for label, value in items:
        match = _CFG_SUFFIX.match(label)
        base = match.group(1) if match else label
        grouped.setdefault(base, []).append((match.group(2) if match else "", value))
    out = []
    for base, entries in grouped.items():
        if len(entries) == 1 and not entries[0][0]:
            out.append((base, format_number(entries[0][1])))
        else:
            scales = "/".join(scale or "?" for scale, _ in entries)
            out.append((f"{base} (cfg {scales})", "/".join(format_number(v) for _, v in entries)))
    return out


def _paths(result: dict) -> tuple[list[tuple[str, str]], int, str | None]:
    """(label, path) of the outputs to show, how many more there are, and the image to look at first (the PNG
    under a ``grid`` key, else the first PNG)."""
    named = [(key, result[key]) for key in PATH_KEYS if _looks_like_path(result.get(key))]
    named += [(key, value) for key, value in result.items()
              if key.endswith("_dir") and key not in PATH_KEYS and _looks_like_path(value)]
    shown = {value for _, value in named}
    items = [(_dir_label(key), value) for key, value in named]
    grids, pngs = [], []
    for path, value in _leaves(result):
        if isinstance(value, str) and value.lower().endswith(".png"):
            pngs.append(value)
            if path and path[-1] == "grid":
                grids.append(value)
            if value not in shown:
                shown.add(value)
                items.append((_image_label(path), value))
    key_image = (grids or pngs or [None])[0]
    return items[:MAX_PATHS], max(0, len(items) - MAX_PATHS), key_image


def _dir_label(key: str) -> str:
    """``final_dir`` → final, ``out_dir`` → output."""
    label = key[:-4] if key.endswith("_dir") else key
    return "output" if label == "out" else label


def _image_label(path: tuple[str, ...]) -> str:
    """``files/fid_vs_clip.png`` → fid_vs_clip, ``prompt_following/grid`` → prompt_following, a list → image."""
    leaf = path[-1] if path else ""
    if leaf.lower().endswith(".png"):
        return leaf[:-4]
    if leaf in ("grid", "image", "path", "png") and len(path) > 1:
        return path[-2]
    return "image" if leaf in ("outputs", "files", "") else leaf


def headline(result: dict) -> Headline:
    counts = [(key, result[key]) for key in COUNT_KEYS if _is_number(result.get(key))]
    metrics, more_metrics = _metrics(result)
    paths, more_paths, key_image = _paths(result)
    return Headline(counts, metrics, more_metrics, paths, more_paths, key_image)


# ------------------------------------------------------------------------------------------------------ summary
def _facts(result: dict) -> list[str]:
    """Counts and metrics, e.g. ``kept 50``, ``fid (cfg 3/5) 312/298``."""
    if result.get("skipped") is True:
        return ["skipped: its outputs are complete for this config"]
    head = headline(result)
    parts = [f"{key} {format_number(value)}" for key, value in head.counts]
    parts += [f"{label} {text}" for label, text in head.metrics]
    if head.more_metrics:
        parts.append(f"+{head.more_metrics} more")
    return parts


def _wrap(parts: list[str], first: str, indent: str) -> list[str]:
    """``a · b · c`` after ``first``; past LINE_WIDTH it goes on in lines starting with ``indent``."""
    lines, current = [], ""
    for part in parts:
        candidate = f"{current} · {part}" if current else part
        if current and len((indent if lines else first) + candidate) > LINE_WIDTH:
            lines.append(current)
            current = part
        else:
            current = candidate
    lines.append(current)
    return [((indent if i else first) + text).rstrip() for i, text in enumerate(lines)]


def _sub_stages(result: dict) -> dict[str, dict]:
    stages = result.get("stages")
    if isinstance(stages, dict) and stages and all(isinstance(v, dict) for v in stages.values()):
        return stages
    return {}


def _table(rows: list[tuple[str, str]], indent: str) -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


def _sub_stage_paths(head: Headline) -> list[tuple[str, str]]:
    """A sub-stage shows its main output and the image to look at."""
    rows = head.paths[:1]
    image = next((row for row in head.paths if row[1] == head.key_image), None)
    if head.key_image and image is None:
        image = ("image", head.key_image)
    return rows + ([image] if image and image not in rows else [])


def _key_image(result: dict) -> str | None:
    return None if result.get("skipped") is True else headline(result).key_image


def summary_text(stage: str, result: dict, *, result_uri: str | None = None, log_path: str | None = None,
                 tracking_uri: str | None = None, dashboard_url: str | None = None,
                 dashboard_lives: bool = False) -> str:
    """The lines the CLI prints when ``stage`` finished with ``result``.

    ``dashboard_lives``: the Ray dashboard outlives this command (a cluster it joined), so it is a next step.
    """
    seconds = result.get("seconds")
    took = f" in {format_seconds(seconds)}" if _is_number(seconds) else ""
    subs = _sub_stages(result)
    skipped = sum(1 for r in subs.values() if r.get("skipped") is True)
    extra = f" ({len(subs)} stages, {skipped} skipped as complete)" if subs and "workflow" in result else ""
    lines = ["", f"✔ {stage} finished{took}{extra}"]
    facts = _facts(result)
    if facts:
        lines += _wrap(facts, "  ", "  ")
    if subs:
        width = max(len(name) for name in subs)
        for name, sub in subs.items():
            parts = _facts(sub)
            if _is_number(sub.get("seconds")) and sub.get("skipped") is not True:
                parts.append(format_seconds(sub["seconds"]))
            lines += _wrap(parts, f"  {name:<{width}}  ", " " * (width + 4))
            if sub.get("skipped") is not True:
                lines += _table(_sub_stage_paths(headline(sub)), " " * (width + 4))
    head = headline(result)
    rows = list(head.paths)
    if head.more_paths:
        rows.append(("", f"(+{head.more_paths} more in the full result)"))
    if result_uri:
        rows.append(("full result", result_uri))
    if log_path:
        rows.append(("log", log_path))
    lines += _table(rows, "  ")
    next_steps = []
    if tracking_uri:
        next_steps.append(f"mlflow ui --backend-store-uri {tracking_uri}")
    if dashboard_url and dashboard_lives:
        next_steps.append(f"Ray dashboard: {dashboard_url}")
    images = [image for image in [*(_key_image(sub) for sub in subs.values()), _key_image(result)] if image]
    if images:
        next_steps.append(f"open {images[-1]}")
    if next_steps:
        lines.append("next:")
        lines += [f"  {step}" for step in next_steps]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- errors
def _innermost(exc: BaseException) -> BaseException:
    """Ray wraps an exception raised in a task or a Ray Data UDF; the user needs the original one."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        wrapper = type(exc).__name__ in ("RayTaskError", "UserCodeException", "RayActorError") or \
            type(exc).__name__.startswith("RayTaskError(")
        if wrapper and isinstance(cause, BaseException):
            exc = cause
        elif wrapper and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def _hydra_line(exc: BaseException) -> str | None:
    """Hydra's composition errors in one line; None for other exceptions."""
    try:
        from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(exc.options or [])
        return f"{group}={name} does not exist" + (f"; choose one of: {options}" if options else "")
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {exc.message.splitlines()[0]}"
    if isinstance(exc, CompactHydraException):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        keep = [ln for ln in lines[:3] if not ln.startswith(("full_key:", "object_type=", "See ", "Config search"))]
        text = " ".join(ln if ln.endswith((".", ":", ";")) else ln + ";" for ln in keep).rstrip(";")
        cause = next((ln.strip() for ln in str(exc.__cause__ or "").splitlines() if ln.strip()), "")
        return (text or type(exc).__name__) + (f" ({cause})" if cause and cause not in text else "")
    return None


def error_line(exc: BaseException, stage: str | None = None, log_path: str | None = None) -> str:
    """``error: ...`` in one line: what went wrong and where the full trace is."""
    failed = getattr(exc, "failed_stage", None)  # set by pipeline.dispatch: the sub-stage of a chain that failed
    exc = _innermost(exc)
    hydra = _hydra_line(exc)
    if hydra is not None:
        return f"error: {hydra}"
    if type(exc).__name__ == "ConfigError":  # pipeline.registry's: the message says what to set
        return f"error: {exc}"
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    name = type(exc).__name__
    message = text if isinstance(exc, ValueError) and text else f"{name}: {text}" if text else name
    if stage and f"stage={stage}" not in message:
        where = f" in {failed}" if failed and failed != stage else ""
        message = f"stage={stage} failed{where}: {message}"
    where = f"full trace in {log_path} or with HYDRA_FULL_ERROR=1" if log_path else "HYDRA_FULL_ERROR=1 shows the trace"
    return f"error: {message}  ({where})"
