"""The KubeRay manifests against KubeRay v1.7.0: its CRD schemas (a trimmed copy beside this file, validated strictly,
as `kubectl apply`'s strict field validation does) and the rules its operator enforces before it acts
(ray-operator/controllers/ray/utils/validation.go: ValidateRayJobSpec, ValidateRayClusterSpec and the metadata checks),
restated here for the fields these manifests use. Plus what Kubernetes needs to schedule the pods at all."""

import copy
import json
import os
import re

import pytest
import yaml

from tests.pipeline.cluster_files import INSTANCE_SIZES, image_has_registry, load, read, settings

MAX_RAYCLUSTER_NAME = 53  # utils.MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # utils.MaxRayJobNameLength
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # utils.RayJobClusterSelectorKey
SCHEMAS = os.path.join(os.path.dirname(__file__), "kuberay_v1_7_0_crd_schemas.json")


# ---- KubeRay's operator checks, restated ------------------------------------------------------------------------

def metadata_errors(metadata: dict, max_length: int) -> list[str]:
    name = metadata.get("name", "")
    errors = [] if len(name) <= max_length else [f"name should be no more than {max_length} characters"]
    if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):
        errors.append(f"name {name!r} should be a valid DNS1035 label")
    return errors


def raycluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    groups = [("Head", spec["headGroupSpec"])] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"].get("spec", {}).get("containers"):
            errors.append(f"{name} group should have at least one container")
        start = group.get("rayStartParams") or {}
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group")
        if "labels" in start:
            errors.append(f"rayStartParams['labels'] is not supported for {name} group")
        if name == "Head":
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if (low is not None and low < 0) or (high is not None and high < 0):
            errors.append(f"worker group {name} has negative replicas")
        if low is not None and high is not None and low > high:
            errors.append(f"worker group {name} has minReplicas {low} greater than maxReplicas {high}")
        if group.get("suspend") and autoscaling:
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    if (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    return errors


def rayjob_spec_errors(job: dict) -> list[str]:
    spec = job["spec"]
    errors = metadata_errors(job["metadata"], MAX_RAYJOB_NAME)
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    backoff = spec.get("backoffLimit")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("TTLSecondsAfterFinished must be a non-negative integer")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if spec.get("suspend") and selector:
        errors.append("the ClusterSelector mode doesn't support the suspend operation")
    if spec.get("rayClusterSpec") is None and not selector:
        errors.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector:
        if not selector.get(CLUSTER_SELECTOR_KEY):
            errors.append("cluster name in ClusterSelector should not be empty")
        if mode == "SidecarMode":
            errors.append("ClusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append("BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        errors.append("SidecarMode doesn't support SubmitterPodTemplate or SubmitterConfig")
    if spec.get("rayClusterSpec") is not None:
        errors += raycluster_spec_errors(spec["rayClusterSpec"])
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as err:
        errors.append(f"runtimeEnvYAML is not YAML: {err}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{field} must be a positive integer")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must be a positive integer")
    return errors


# ---- the checks --------------------------------------------------------------------------------------------------

def _strict(schema):
    """Unknown fields become errors (the API server prunes them silently; `kubectl apply` rejects them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validators():
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMAS) as f:
        schemas = json.load(f)
    return {kind: jsonschema.Draft7Validator(_strict({"definitions": schemas["definitions"], **schemas[kind]}))
            for kind in ("RayCluster", "RayJob")}


def _schema_errors(validators, manifest):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[manifest["kind"]].iter_errors(manifest)]


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_manifests_match_kuberays_crd_schema(validators, path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert _schema_errors(validators, manifest) == []


def test_schema_check_catches_misplaced_fields(validators):
    job = load("cluster/kuberay/rayjob.yaml")
    job["spec"]["backofLimit"] = 2  # a typo the API server would drop without a word
    assert any("backofLimit" in e for e in _schema_errors(validators, job))
    cluster = load("cluster/kuberay/raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "0"
    assert _schema_errors(validators, cluster)


def test_rayjob_passes_the_operators_validation():
    job = load("cluster/kuberay/rayjob.yaml")
    assert rayjob_spec_errors(job) == []
    assert "backoffLimit" not in job["spec"]


@pytest.mark.parametrize("change, message", [
    ({"backoffLimit": 2}, "BackoffLimit is incompatible with ClusterSelector mode"),
    ({"clusterSelector": {CLUSTER_SELECTOR_KEY: ""}}, "cluster name in ClusterSelector should not be empty"),
    ({"clusterSelector": None}, "one of RayClusterSpec or ClusterSelector must be set"),
    ({"submissionMode": "SidecarMode"}, "ClusterSelector is not supported in SidecarMode"),
    ({"suspend": True}, "not allowed to be suspended"),
    ({"ttlSecondsAfterFinished": 60}, "cannot have TTLSecondsAfterFinished"),
    ({"activeDeadlineSeconds": 0}, "activeDeadlineSeconds must be a positive integer"),
    ({"runtimeEnvYAML": "env_vars: {a: [1"}, "runtimeEnvYAML is not YAML"),
])
def test_rayjob_rules_reject_what_the_operator_rejects(change, message):
    job = load("cluster/kuberay/rayjob.yaml")
    job["spec"].update(change)
    assert any(message in e for e in rayjob_spec_errors(job)), rayjob_spec_errors(job)


def test_a_rayjob_that_owns_its_cluster_may_retry():
    """The other shape KubeRay accepts: rayClusterSpec (the job creates its cluster) with backoffLimit."""
    job = load("cluster/kuberay/rayjob.yaml")
    job["spec"].pop("clusterSelector")
    job["spec"].update(backoffLimit=2, shutdownAfterJobFinishes=True,
                       rayClusterSpec=copy.deepcopy(load("cluster/kuberay/raycluster.yaml")["spec"]))
    assert rayjob_spec_errors(job) == []
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 40
    assert any("greater than maxReplicas" in e for e in rayjob_spec_errors(job))


def test_raycluster_passes_the_operators_validation():
    cluster = load("cluster/kuberay/raycluster.yaml")
    assert metadata_errors(cluster["metadata"], MAX_RAYCLUSTER_NAME) == []
    assert raycluster_spec_errors(cluster["spec"]) == []


def test_rayjob_targets_the_raycluster_with_the_shared_runtime_env():
    cluster, job = load("cluster/kuberay/raycluster.yaml"), load("cluster/kuberay/rayjob.yaml")
    assert job["spec"]["clusterSelector"] == {CLUSTER_SELECTOR_KEY: cluster["metadata"]["name"]}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == load("cluster/runtime_env.yaml")


def test_ray_version_matches_the_image():
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py(\d)(\d+)-gpu$", read("cluster/Dockerfile"), re.M)
    locked = re.search(r"^ray==(\S+)$", read("cluster/requirements.lock"), re.M)
    assert base and locked
    assert load("cluster/kuberay/raycluster.yaml")["spec"]["rayVersion"] == base[1] == locked[1]


# ---- what Kubernetes needs to schedule the pods -------------------------------------------------------------------

_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text) -> float:
    """A Kubernetes resource quantity ("500m", "56Gi", "8") as a number (cores, bytes, devices)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(text))
    assert match and match[2] in _UNITS, f"not a quantity: {text!r}"
    return float(match[1]) * _UNITS[match[2]]


def test_quantity_parser():
    assert quantity("500m") == 0.5 and quantity("56Gi") == 56 * 2**30 and quantity(8) == 8
    with pytest.raises(AssertionError):
        quantity("12 cores")


def _groups():
    spec = load("cluster/kuberay/raycluster.yaml")["spec"]
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def test_pod_requests_leave_headroom_below_the_node():
    node_types = load("cluster/ray-cluster.yaml")["available_node_types"]
    for name, group in _groups():
        # The KubeRay groups are the launcher's node types (same names, '-' for '_'), sized for the same instances.
        vcpus, gib, gpus = INSTANCE_SIZES[node_types[name.replace("-", "_")]["node_config"]["InstanceType"]]
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{name}: limits equal requests, so Ray sizes itself to what the pod gets"
        # The kubelet's reservations and DaemonSets take a few cores and GiB; a pod asking for the whole node
        # (or more) stays Pending.
        assert quantity(requests["cpu"]) <= 0.95 * vcpus, name
        assert quantity(requests["memory"]) <= 0.9 * gib * 2**30, name
        assert quantity(requests.get("nvidia.com/gpu", 0)) == gpus, name
        for volume in pod.get("volumes", []):
            if (volume.get("emptyDir") or {}).get("medium") == "Memory":  # counts against the memory limit
                assert quantity(volume["emptyDir"]["sizeLimit"]) < quantity(limits["memory"]), name


def test_every_container_pulls_the_configured_image():
    for name, group in _groups():
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == settings()["image"], name
            assert image_has_registry(container["image"]), name


def test_gpu_pods_tolerate_the_gpu_taint():
    gpu_groups = [group["template"]["spec"] for _name, group in _groups()
                  if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for pod in gpu_groups:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
