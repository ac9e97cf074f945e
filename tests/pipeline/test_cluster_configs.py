"""The cluster files, checked with the upstream projects' own code where they have it (no cloud, no Ray start):
the launcher YAML with Ray's prepare_config + validate_config and its EC2 requests with botocore's parameter
validator, runtime_envs against Ray's known fields, Serve configs with Serve's ServeDeploySchema, entrypoints and
overrides by composing the pipeline's Hydra config. The one-place settings are checked here too."""

import copy
import os
import re
import shlex
import shutil

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.registry import STAGES
from tests.pipeline.cluster_files import (CLUSTER, REPO, image_has_registry, has_tag_or_digest, load,
                                          readme_cluster_section, settings, sync_settings)

CONF = os.path.join(REPO, "pipeline", "conf")
EFA_AMI_PARAMETER = re.compile(
    r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-2\d\.04/latest/ami-id")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _prepared_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load("cluster/ray-cluster.yaml"))
    validate_config(config)
    return config


# ---- one place for each deployment value ------------------------------------------------------------------------

def test_every_cluster_file_carries_the_settings():
    assert sync_settings.sync(check=True) == [], "run `python cluster/sync_settings.py` after editing settings.yaml"
    used = set()
    for path in sync_settings.target_files():
        used |= sync_settings.sync_text(open(path).read(), settings(), where=path)[1]
    assert used == set(settings()), f"settings no file uses: {set(settings()) - used}"


def test_changing_a_setting_rewrites_every_file_that_uses_it(tmp_path):
    root = tmp_path / "cluster"
    shutil.copytree(CLUSTER, root, ignore=shutil.ignore_patterns("Dockerfile", "*.lock", "*.py", "*.in"))
    changed = dict(settings(), image="registry.example.com/team/sdxl:9.9", mlflow_tracking_uri="http://tracking:80")
    (root / "settings.yaml").write_text(yaml.safe_dump(changed))

    rewritten = sync_settings.sync(check=False, settings_path=str(root / "settings.yaml"), root=str(root))

    def read(name):
        return yaml.safe_load((root / name).read_text())

    assert {os.path.relpath(p, root) for p in rewritten} == {
        "ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml", "serve_config.yaml"}
    assert read("ray-cluster.yaml")["docker"]["image"] == "registry.example.com/team/sdxl:9.9"
    cluster = read("kuberay/raycluster.yaml")["spec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for t in templates for c in t["spec"]["containers"]} == {"registry.example.com/team/sdxl:9.9"}
    job_env = yaml.safe_load(read("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert job_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://tracking:80"
    assert read("runtime_env.yaml")["env_vars"]["MLFLOW_TRACKING_URI"] == "http://tracking:80"
    assert sync_settings.sync(check=True, settings_path=str(root / "settings.yaml"), root=str(root)) == []


def test_sync_refuses_unknown_keys_and_unsafe_values(tmp_path):
    with pytest.raises(KeyError, match="nope"):
        sync_settings.sync_text("image: x  # settings: nope\n", {"image": "y"})
    bad = tmp_path / "settings.yaml"
    bad.write_text("image: 'two words'\n")
    with pytest.raises(ValueError, match="image"):
        sync_settings.load_settings(str(bad))


def test_image_names_a_registry_and_a_tag():
    image = settings()["image"]
    assert image_has_registry(image) and has_tag_or_digest(image), image
    assert not image_has_registry("sdxl-pipeline:0.1.0") and image_has_registry("localhost:5000/sdxl:1")
    assert _prepared_launcher_config()["docker"]["image"] == image


# ---- launcher YAML -----------------------------------------------------------------------------------------------

def test_launcher_yaml_passes_rays_own_validation():
    config = _prepared_launcher_config()
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_h100x8"]["resources"] == {"CPU": 192, "GPU": 8}
    # Ray's AWS defaults pip-install packages at node start unless the config says otherwise.
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []


def test_launcher_nodes_boot_a_driver_580_ami_not_rays_default():
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    config = _prepared_launcher_config()
    before = {name: t["node_config"]["ImageId"] for name, t in config["available_node_types"].items()}
    _check_ami(config)  # what `ray up` does: fills Ray's default AMI into node types without ImageId
    after = {name: t["node_config"]["ImageId"] for name, t in config["available_node_types"].items()}
    assert after == before
    for image_id in after.values():
        assert EFA_AMI_PARAMETER.fullmatch(image_id) or re.fullmatch(r"ami-[0-9a-f]{8,17}", image_id), image_id
        assert image_id not in DEFAULT_AMI.values()


def _run_instances_request(node_config: dict) -> dict:
    """The EC2 RunInstances parameters Ray's AWS node provider builds from a node_config (create_node)."""
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface

    request = copy.deepcopy(_configure_node_type_from_network_interface({"node_config": node_config})["node_config"])
    subnet_ids = request.pop("SubnetIds")
    if "NetworkInterfaces" in request:
        request.pop("SecurityGroupIds", None)
    else:
        request["SubnetId"] = subnet_ids[0]
    request.update({"MinCount": 1, "MaxCount": 1, "TagSpecifications": [
        {"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name", "Value": "sdxl"}]}]})
    return request


def test_launcher_node_configs_are_valid_ec2_requests():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import validate_parameters

    run_instances = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances")
    instance_types = run_instances.input_shape.members["InstanceType"].enum
    for name, node_type in _prepared_launcher_config()["available_node_types"].items():
        request = _run_instances_request(node_type["node_config"])
        validate_parameters(request, run_instances.input_shape)  # raises ParamValidationError naming the field
        assert request["InstanceType"] in instance_types, name


def test_p5_nodes_use_efa_in_a_cluster_placement_group():
    config = _prepared_launcher_config()
    gpu = config["available_node_types"]["gpu_h100x8"]
    node = gpu["node_config"]
    assert node["InstanceType"] == "p5.48xlarge"
    assert node["Placement"] == {"GroupName": settings()["aws_placement_group"]}
    interfaces = node["NetworkInterfaces"]
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(32))  # p5.48xlarge: 32 network cards
    primary = [i for i in interfaces if i["NetworkCardIndex"] == 0]
    assert primary == [dict(primary[0], DeviceIndex=0, InterfaceType="efa")]
    assert {(i["DeviceIndex"], i["InterfaceType"]) for i in interfaces if i["NetworkCardIndex"]} == {(1, "efa-only")}
    assert {i["SubnetId"] for i in interfaces} == {settings()["aws_subnet_id"]}
    assert {g for i in interfaces for g in i["Groups"]} == {settings()["aws_security_group_id"]}
    options = " ".join(gpu["docker"]["worker_run_options"])
    assert "--gpus all" in options and "/dev/infiniband" in options
    assert "memlock=-1" in options and "IPC_LOCK" in options
    # Head and CPU workers share the subnet and security group, so they can reach the GPU nodes.
    for name in ("head", "cpu_data"):
        assert config["available_node_types"][name]["node_config"]["SubnetIds"] == [settings()["aws_subnet_id"]]
    assert config["provider"]["use_internal_ips"] is True  # multi-interface nodes get no public IP


# ---- runtime_env -------------------------------------------------------------------------------------------------

def _runtime_envs():
    job = load("cluster/kuberay/rayjob.yaml")
    serve_apps = load("cluster/serve_config.yaml")["applications"]
    return {"runtime_env.yaml": load("cluster/runtime_env.yaml"),
            "rayjob.yaml": yaml.safe_load(job["spec"]["runtimeEnvYAML"]),
            **{f"serve_config.yaml:{a['name']}": a["runtime_env"] for a in serve_apps}}


def test_runtime_env_fields_are_ones_ray_knows(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    public_fields = {f for f in RuntimeEnv.known_fields if not f.startswith("_")}
    monkeypatch.chdir(REPO)  # working_dir "." is the repository root here, the image's WORKDIR on a cluster
    for where, env in _runtime_envs().items():
        # Ray takes unknown keys silently as plugin names: a typo would be dropped without a word.
        assert set(env) <= public_fields, f"{where}: unknown runtime_env keys {set(env) - public_fields}"
        RuntimeEnv(**env)  # Ray's own validation of each field's value
        assert all(isinstance(v, str) for v in env["env_vars"].values()), where
        assert env["env_vars"]["MLFLOW_TRACKING_URI"] == settings()["mlflow_tracking_uri"], where
        assert env["env_vars"]["SDXL_ROOT"] == settings()["sdxl_root"], where


def test_the_pipeline_config_reads_the_runtime_env(monkeypatch):
    env = load("cluster/runtime_env.yaml")["env_vars"]
    from hydra.core.hydra_config import HydraConfig

    for name in ("SDXL_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, env[name])
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=["stage=pretrain256", "preset=full"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # paths.root's fallback names hydra:runtime.cwd, as under pipeline/run.py
    try:
        assert cfg.paths.root == settings()["sdxl_root"]
        assert cfg.mlflow.tracking_uri == settings()["mlflow_tracking_uri"]
    finally:
        HydraConfig.instance().cfg = None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _compose(["stage=pretrain256"]).mlflow.tracking_uri is None  # local default: SQLite under the root


def test_efa_environment_for_nccl():
    env = load("cluster/runtime_env.yaml")["env_vars"]
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert {"docker", "lo"} <= set(env["NCCL_SOCKET_IFNAME"].lstrip("^").split(","))


# ---- Serve configs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, host", [("stages/serve/serve_config.yaml", "127.0.0.1"),
                                        ("cluster/serve_config.yaml", "0.0.0.0")])
def test_serve_configs_pass_serves_schema(path, host):
    import ast
    import importlib.util

    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load(path))
    assert schema.http_options.host == host
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        # The builder exists (read from the source: importing the app module costs seconds of torch imports).
        source = open(importlib.util.find_spec(module).origin).read()
        assert attr in {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}, app.import_path
        cfg = _compose(["stage=serve", *app.args["overrides"]])
        OmegaConf.to_container(cfg.serve, resolve=True)


def test_cluster_serve_config_runs_the_full_app_on_gpus():
    (app,) = load("cluster/serve_config.yaml")["applications"]
    cfg = _compose(["stage=serve", *app["args"]["overrides"]])
    assert cfg.model.preset == "full"
    assert cfg.serve.deployments.base.ray_actor_options.num_gpus >= 1
    assert str(cfg.serve.model_uri).startswith("models:/")


# ---- entrypoints and the README walkthrough ----------------------------------------------------------------------

def _check_entrypoint(command: str):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "pipeline/run.py"], command
    stages = [a.split("=", 1)[1] for a in argv if a.startswith("stage=")]
    assert len(stages) == 1 and stages[0] in STAGES, f"unknown stage in {command!r}"
    _compose(argv[2:])  # Hydra rejects a key the config does not have


def _readme_job_commands():
    return [line.split(" -- ", 1)[1] for line in readme_cluster_section().splitlines()
            if line.startswith("ray job submit") and " -- " in line]


def test_job_entrypoints_name_real_stages_and_keys():
    commands = _readme_job_commands()
    assert len(commands) >= 6
    for command in [load("cluster/kuberay/rayjob.yaml")["spec"]["entrypoint"], *commands]:
        _check_entrypoint(command)
    assert all("--runtime-env cluster/runtime_env.yaml" in line for line in readme_cluster_section().splitlines()
               if line.startswith("ray job submit"))


def test_readme_walkthrough_uses_the_one_mlflow_uri_and_image_setting():
    section = readme_cluster_section()
    uris = set(re.findall(r"https?://[\w.-]+:\d+", section))
    assert settings()["mlflow_tracking_uri"] in uris
    assert uris - {settings()["mlflow_tracking_uri"]} <= {"http://127.0.0.1:8265", "http://127.0.0.1:8000",
                                                          "http://127.0.0.1:5000"}, uris
    assert "cluster/settings.yaml" in section and "sync_settings.py --get image" in section
    assert not re.search(r"(?<![\w./-])sdxl-pipeline:[\w.]+", section), "an image name without a registry"
