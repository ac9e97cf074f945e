"""A private local Ray head on 127.0.0.1 for tests — its own temp dir and ports — and `ray job submit` against it.

Stopped by process id: `ray stop` would stop every Ray on the machine, other people's included.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from tests.cluster.helpers import (
    QUIET_ENV,
    RAY_CLI,
    REPO,
    RUN_PY,
    child_env,
    descendants,
    free_ports,
    signal_all,
    wait_for,
    wait_gone,
)

# What the job's working dir must not carry: the virtualenv, local outputs and stores, caches.
JOB_EXCLUDES = [".venv", ".git", "outputs", "*.db", "mlruns", ".pytest_cache", ".hypothesis", "**/__pycache__"]


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports, stopped by process id."""

    def __init__(self, num_cpus: int = 2, log_dir: Path | None = None):
        self.num_cpus = num_cpus
        # Short: Ray's unix socket paths live under it and must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        (self.port, self.dashboard_port, self.client_port, self.agent_port, self.agent_grpc_port, self.metrics_port,
         self.runtime_env_port) = free_ports(7)
        self.log_path = Path(log_dir or self.temp_dir) / "ray-head.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        """Environment of processes on this head (the job drivers inherit it) and of the `ray job` CLI: the venv's
        python first on PATH. Token authentication is off for this loopback-only head: with it on, Ray 2.60 takes the
        token from ~/.ray/auth_token, shared with every other local Ray of this user."""
        return child_env({"RAY_TMPDIR": self.temp_dir, "RAY_AUTH_MODE": "disabled"})

    def start(self, timeout_s: float = 180) -> "RayHead":
        # Every port that would otherwise have a fixed default is chosen here, so this head never collides with
        # another local Ray (the ray client server's 10001, the dashboard agent's 52365, ...).
        cmd = [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}", f"--metrics-export-port={self.metrics_port}",
               f"--runtime-env-agent-port={self.runtime_env_port}", "--object-store-memory=200000000"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._dashboard_up, timeout_s, f"the Ray head's dashboard at {self.dashboard_url}",
                 interval_s=0.25, proc=self.proc, log_path=self.log_path)
        return self

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as resp:
                return resp.status == 200
        except (OSError, http.client.HTTPException):  # not up yet, or not yet speaking HTTP
            return False

    def alive_nodes(self) -> int:
        """Alive nodes of the cluster, from the head's state API (0 while it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?limit=100", timeout=10) as resp:
                nodes = json.loads(resp.read())["data"]["result"]["result"]
        except (OSError, http.client.HTTPException, KeyError, ValueError):
            return 0
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def own_processes(self) -> list[psutil.Process]:
        """This head's processes: descendants of `ray start --block`, and any process naming our temp dir."""
        found = {p.pid: p for p in (descendants(self.proc.pid) if self.proc else [])}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    found.setdefault(p.pid, p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if self.proc is not None:
            found.pop(self.proc.pid, None)
        return list(found.values())

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM the head and its processes, SIGKILL what is left after ``grace_s``; remove the temp dir.

        (Ray's daemons do not exit on SIGTERM within seconds, and nothing of a test's head needs a clean shutdown,
        so the grace is short: a teardown took 20 s with 5 s of grace and zombie-blind waits, 1 s now.)
        """
        if self.proc is None:
            return
        family = self.own_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        signal_all(family, signal.SIGTERM)
        alive = wait_gone(family, grace_s)
        signal_all(alive, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        wait_gone(alive, 10)
        stragglers = self.own_processes()
        signal_all(stragglers, signal.SIGKILL)
        wait_gone(stragglers, 10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.proc = None

    # ---- jobs ----

    def submit(self, args: list[str], submission_id: str, env_vars: dict | None = None, timeout_s: float = 180) -> str:
        """`ray job submit --no-wait --working-dir <repo> -- python pipeline/run.py ARGS`; returns the submission id."""
        runtime_env = {"excludes": JOB_EXCLUDES, "env_vars": {**QUIET_ENV, **(env_vars or {})}}
        cmd = [RAY_CLI, "job", "submit", "--address", self.dashboard_url, "--submission-id", submission_id,
               "--no-wait", "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
               "--", "python", RUN_PY, *args]
        out = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        assert out.returncode == 0, f"ray job submit failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        return submission_id

    def wait_job(self, submission_id: str, timeout_s: float) -> tuple[str, str]:
        """Wait (bounded) for a job to reach a terminal state; (status, logs). A job still running is stopped."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url)
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(submission_id)
        while status not in terminal and time.monotonic() < deadline:
            time.sleep(0.5)
            status = client.get_job_status(submission_id)
        logs = client.get_job_logs(submission_id)
        if status not in terminal:
            client.stop_job(submission_id)
            raise AssertionError(f"job {submission_id} still {status} after {timeout_s}s:\n{logs[-6000:]}")
        return str(status.value if hasattr(status, "value") else status), logs


class RayWorkerNode(RayHead):
    """A second node joining ``head``: `ray start --address=<head> --block` on 127.0.0.1 with its own temp dir and
    ports, stopped by process id like the head."""

    def __init__(self, head: RayHead, num_cpus: int = 1, log_dir: Path | None = None):
        super().__init__(num_cpus, log_dir)
        self.head = head
        self.log_path = self.log_path.with_name("ray-worker.log")

    def start(self, timeout_s: float = 180) -> "RayWorkerNode":
        cmd = [RAY_CLI, "start", f"--address={self.head.address}", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
               f"--node-manager-port={self.port}", f"--object-manager-port={self.client_port}",
               f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
               f"--metrics-export-port={self.metrics_port}", f"--runtime-env-agent-port={self.runtime_env_port}",
               "--object-store-memory=200000000"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self.head.alive_nodes() >= 2, timeout_s, "the second node in the head's node list",
                 interval_s=0.25, proc=self.proc, log_path=self.log_path)
        return self

