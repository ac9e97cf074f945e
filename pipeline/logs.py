"""Where a run's details go: a log file per stage under ``<root>/logs/``, while the terminal shows only what a user
follows (pipeline messages, warnings, one progress bar per Ray Data dataset).

Ray Data, left alone, prints an execution plan, a log location and (when stdout is not a terminal) a block of
progress and resource lines every 10 s for every dataset. ``configure_ray_data_output`` turns the per-operator bars
off (one bar per dataset, i.e. per stage), and replaces Ray Data's console handler with one that prints a single
progress line at most every ``progress_interval_s`` when stdout is not a terminal; everything Ray Data logs still goes
to the run's log file and to Ray's session log folder.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback

from pipeline import storage

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"
# Loggers that do not propagate to the root logger, so the run log is attached to them as well.
_NON_PROPAGATING = ("ray", "ray.data")

_state: dict = {"handler": None, "path": None, "label": None}


# -------------------------------------------------------------------------------------------------- run log file
def run_log_path(root: str, stage: str) -> str:
    """``<root>/logs/<stage>.log``; for an object-store root a local folder (a log is appended line by line)."""
    if storage.is_remote(root):
        folder = os.path.join(os.path.expanduser("~/.cache/sdxl-pipeline"), "logs")
    else:
        folder = os.path.join(os.path.abspath(str(root)), "logs")
    return os.path.join(folder, f"{stage}.log")


def open_run_log(path: str, command: str) -> str:
    """Append this run's log records (INFO and up, every logger, Ray's included) to ``path``."""
    close_run_log()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.stream.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    logging.getLogger().addHandler(handler)
    _state.update(handler=handler, path=path)
    _attach_to_ray_loggers()
    return path


def close_run_log() -> None:
    handler = _state.get("handler")
    if handler is None:
        return
    for name in ("", *_NON_PROPAGATING):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
    _state.update(handler=None, path=None)


def current_run_log() -> str | None:
    return _state.get("path")


def record_failure(exc: BaseException) -> None:
    """The full traceback into the run log only (the terminal gets one line)."""
    handler = _state.get("handler")
    if handler is None:
        return
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    handler.stream.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR pipeline.run] the run failed:\n{text}")
    handler.flush()


def _attach_to_ray_loggers() -> None:
    """Ray's loggers keep their records to themselves; give the run log a copy. Ray Data's logger is configured
    when ``ray.data`` is imported (which replaces its handlers), so it is attached only once that happened."""
    handler = _state.get("handler")
    if handler is None:
        return
    handler.setFormatter(logging.Formatter(LOG_FORMAT))  # ray.init re-formats the handlers of its logger
    for name in _NON_PROPAGATING:
        if name == "ray.data" and "ray.data" not in sys.modules:
            continue
        logger = logging.getLogger(name)
        if handler not in logger.handlers:
            logger.addHandler(handler)


# ----------------------------------------------------------------------------------------- Ray Data on the console
def set_progress_label(label: str | None) -> None:
    """The name progress lines carry (the running stage)."""
    _state["label"] = label


_DATASET = re.compile(r"Running Dataset:? (\S+?)\.? ")
_TOTAL = re.compile(r"^Total Progress: (\d+)/(\S+)")
_FINISHED = re.compile(r"Dataset (\S+) execution (finished in [\d.]+ seconds|failed)")


class RayDataConsoleHandler(logging.Handler):
    """Ray Data's records on the terminal: warnings and errors as they come; of the progress reports only the
    total, one line per dataset at most every ``interval_s`` (stdout not a terminal: Ray's bars are off there),
    and the line saying a dataset finished. Plans, log locations and resource lines stay in the log files."""

    def __init__(self, stream=None, interval_s: float = 30.0, tty: bool | None = None):
        super().__init__(logging.INFO)
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = float(interval_s)
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._dataset: str | None = None
        self._last_line: dict[str, float] = {}

    def _label(self, dataset: str | None) -> str:
        stage = _state.get("label")
        name = dataset_name(dataset)
        return " ".join(part for part in (stage, name) if part) or "ray data"

    def console_message(self, record: logging.LogRecord) -> str | None:
        """What to print for ``record``; None to leave it to the log files."""
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            # Turning the per-operator bars off is our choice, not news for the user.
            return None if message.startswith("Progress bars for operators disabled") else message
        header = _DATASET.search(message)
        if header and message.startswith("=="):
            self._dataset = header.group(1)
            return None
        total = _TOTAL.match(message)
        if total:
            key = self._dataset or ""
            now = time.monotonic()
            if now - self._last_line.get(key, -1e9) < self.interval_s:
                return None
            self._last_line[key] = now
            return f"{self._label(self._dataset)}: {total.group(1)}/{total.group(2)} rows"
        finished = _FINISHED.search(message)
        if finished and not self.tty:  # a terminal keeps the finished bar on screen
            return f"{self._label(finished.group(1))}: {finished.group(2)}"
        return None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.console_message(record)
            if text is None:
                return
            shown = logging.makeLogRecord({**record.__dict__, "msg": text, "args": None, "name": "ray.data"})
            self.stream.write(self.format(shown) + "\n")
            self.flush()
        except Exception:  # a console problem must not stop a stage
            self.handleError(record)

    def flush(self) -> None:
        if hasattr(self.stream, "flush"):
            self.stream.flush()


def dataset_name(dataset_id: str | None) -> str | None:
    """The name a stage gave its dataset (``ds.set_name``), None for Ray's anonymous ``dataset_<id>_<n>``."""
    if not dataset_id:
        return None
    match = re.match(r"^(.+?)_[0-9A-Za-z]{16,}_\d+$", dataset_id)
    name = match.group(1) if match else dataset_id
    return None if name == "dataset" else name


def configure_ray_data_output(progress_interval_s: float = 30.0) -> None:
    """One progress bar per dataset (no per-operator bars, no verbose progress), Ray Data's console trimmed as the
    handler above says, and its records copied to the run log. Call in the driver before stages build datasets
    (a dataset copies the current DataContext when it is created)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = True
    context.enable_operator_progress_bars = False
    context.execution_options.verbose_progress = False
    data_logger = logging.getLogger("ray.data")
    for handler in list(data_logger.handlers):
        if handler.get_name() == "console" or isinstance(handler, RayDataConsoleHandler):
            data_logger.removeHandler(handler)
    console = RayDataConsoleHandler(interval_s=progress_interval_s)
    console.set_name("console")
    data_logger.addHandler(console)
    _attach_to_ray_loggers()
