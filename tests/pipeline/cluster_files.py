"""Shared by the tests/pipeline/test_cluster_*.py checks: where the cluster files are, and how to read them."""

import importlib.util
import os
import re

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER = os.path.join(REPO, "cluster")

# cluster/ is a folder of deployment files, not a package: load its script by path.
_spec = importlib.util.spec_from_file_location("sync_settings", os.path.join(CLUSTER, "sync_settings.py"))
sync_settings = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_settings)

# vCPU, GiB of memory and GPUs of the instance types the cluster files name (EC2's published sizes).
INSTANCE_SIZES = {"m7i.4xlarge": (16, 64, 0), "m7i.16xlarge": (64, 256, 0), "p5.48xlarge": (192, 2048, 8)}


def load(relative_path: str):
    with open(os.path.join(REPO, relative_path)) as f:
        return yaml.safe_load(f)


def settings() -> dict:
    return sync_settings.load_settings()


def read(relative_path: str) -> str:
    with open(os.path.join(REPO, relative_path)) as f:
        return f.read()


def readme_cluster_section() -> str:
    text = read("README.md")
    start = text.index("## On a cluster: from an empty cluster to a served model")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def image_has_registry(image: str) -> bool:
    """Docker's rule: the first path component names a registry only if it has a '.' or ':' or is localhost."""
    first, sep, _rest = image.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def has_tag_or_digest(image: str) -> bool:
    last = image.rsplit("/", 1)[-1]
    return "@sha256:" in image or bool(re.fullmatch(r"[a-z0-9._-]+:[\w][\w.-]{0,127}", last))
