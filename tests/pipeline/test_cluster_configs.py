"""Structural checks of the cluster YAMLs (no kubectl, no cloud): they parse, use the image cluster/Dockerfile
builds, name entrypoints and stages that exist, and describe the same node groups."""

import os
import re
import shlex

import yaml

from pipeline.registry import STAGES

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLUSTER = os.path.join(REPO, "cluster")


def _load(name):
    with open(os.path.join(CLUSTER, name)) as f:
        return yaml.safe_load(f)


def _image_built_by_dockerfile():
    text = open(os.path.join(CLUSTER, "Dockerfile")).read()
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text)
    assert match, "cluster/Dockerfile must document the tag it builds"
    for copied in re.findall(r"^COPY (?:--\S+ )*(\S+)", text, flags=re.M):
        for path in copied.split():
            assert os.path.exists(os.path.join(REPO, path)), f"Dockerfile copies a missing path: {path}"
    return match.group(1)


def _containers(template):
    return template["spec"]["containers"]


def _check_entrypoint(command: str):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "pipeline/run.py"], command
    assert os.path.exists(os.path.join(REPO, argv[1]))
    stages = [a.split("=", 1)[1] for a in argv if a.startswith("stage=")]
    assert stages and stages[0] in STAGES, f"unknown stage in {command!r}"


def test_launcher_yaml():
    image = _image_built_by_dockerfile()
    cfg = _load("ray-cluster.yaml")
    assert cfg["docker"]["image"] == image
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU") == 8]
    cpu = [t for name, t in types.items() if name != cfg["head_node_type"] and "GPU" not in t["resources"]]
    assert gpu and cpu, "needs an 8-GPU group and a CPU group"
    for t in [*gpu, *cpu]:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


def test_kuberay_raycluster_matches_launcher_groups():
    image = _image_built_by_dockerfile()
    rc = _load("kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == "2.60.0"
    templates = [rc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    assert all(c["image"] == image for t in templates for c in _containers(t))
    gpus = {g["groupName"]: _containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in rc["spec"]["workerGroupSpecs"]}
    assert "8" in gpus.values() and None in gpus.values()
    for group in rc["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_rayjob_targets_the_cluster_and_a_real_stage():
    rc = _load("kuberay/raycluster.yaml")
    job = _load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    _check_entrypoint(job["spec"]["entrypoint"])
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "excludes"}


def test_runtime_env():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
