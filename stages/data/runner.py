"""Ray plumbing shared by the data stages: what an operator reserves, and metadata work spread over Ray tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Resources:
    """How many tasks / actors an operator runs and what each one reserves."""

    concurrency: int | None = 1  # None: as many as the cluster's resources allow (task pools only)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @classmethod
    def from_config(cls, section: Any) -> "Resources":
        value = section.get("concurrency", 1)
        concurrency = None if value is None else int(value)
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or null, got {concurrency}")
        return cls(concurrency=concurrency, num_cpus=float(section.get("num_cpus", 1.0)),
                   num_gpus=float(section.get("num_gpus", 0.0) or 0.0))

    def pool_size(self, limit: int) -> int | None:
        """Task-pool size for ``limit`` pending items (None: unbounded)."""
        return None if self.concurrency is None else max(1, min(self.concurrency, limit))

    def remote_args(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus > 0 else {})}


def batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def map_tasks(fn: Callable, groups: list, *args: Any, num_cpus: float = 1.0) -> list:
    """``fn(group, *args)`` for every group as Ray tasks (results in order); inline when Ray is not running (tests,
    tools) or there is a single group, which saves a task's start-up on small datasets."""
    import ray

    if len(groups) <= 1 or not ray.is_initialized():
        return [fn(group, *args) for group in groups]
    remote = ray.remote(num_cpus=num_cpus)(fn)
    refs = [ray.put(a) for a in args]
    return ray.get([remote.remote(group, *refs) for group in groups])
