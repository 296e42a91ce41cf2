"""The serveConfigV2 the chart renders is a Serve config our own code loads: every preset's loads
with cluster/serving/serve_config.py (the project's config validation), names importable
application code, passes Ray Serve's own schema, agrees with the front door's ConfigMap — and the
tiny CPU preset's config actually serves a request on the session's Ray cluster."""

from __future__ import annotations

import base64

import pytest
import yaml

from cluster.config import ClusterConfig, ConfigError, load_config
from cluster.serving.builder import IMPORT_PATH
from cluster.serving.serve_config import load_serve_config, resolve_import_path
from tests.helm.helm_chart import PRESETS, one, render, serve_config_text

def load_rendered(preset: str, toggles: tuple[str, ...] = ()) -> tuple[dict[str, ClusterConfig], dict]:
    """The rendered serveConfigV2, loaded by the project's own loader (no keys taken out)."""
    data = yaml.safe_load(serve_config_text(render(preset, toggles)))
    return load_serve_config(data), data


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("toggles", [(), ("monitoring", "autoscaling", "tls")], ids=["plain", "all-on"])
def test_serve_config_of_each_preset_loads_with_the_project_config_code(preset, toggles):
    configs, data = load_rendered(preset, toggles)
    (name, config), = configs.items()
    assert name == config.serving.app_name == "gptoss"
    app = data["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    builder = resolve_import_path(app["import_path"])
    assert callable(builder) and builder.__module__ == "cluster.serving.builder"
    assert config.model.path.startswith("/models/")
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(data)  # Ray Serve's own schema of the file KubeRay submits
    # The builder sets replicas, placement and autoscaling itself; no Serve-level overrides.
    assert "deployments" not in app
    if "autoscaling" in toggles:
        assert config.serving.autoscaling.enabled


def test_serve_config_carries_engine_replicas_autoscaling_and_auth():
    configs, data = load_rendered("gpt-oss-120b", ("tls",))
    config = configs["gptoss"]
    assert config.serving.num_gpus == 1 and config.serving.max_ongoing_requests == 384
    assert config.engine.max_num_seqs + config.engine.max_waiting_requests <= config.serving.max_ongoing_requests
    assert config.frontdoor.auth.api_keys_file == "/etc/gptoss/api-keys"
    assert config.frontdoor.tls.client_ca_file == "/etc/gptoss/tls/ca.crt"
    assert config.engine.kind == "vllm" and config.serving.router.policy == "prefix_affinity"
    assert config.engine.vllm.gpu_memory_utilization == 0.95 and config.engine.vllm.max_num_batched_tokens == 1024
    auto = config.serving.autoscaling
    assert auto.enabled and (auto.min_replicas, auto.max_replicas) == (1, 8)
    args = data["applications"][0]["args"]
    assert "router" not in args and "deployments" not in data["applications"][0]
    ep_configs, _ = load_rendered("gpt-oss-120b-ep4")
    ep = ep_configs["gptoss"]
    assert ep.parallel.ep_size == 4 and ep.parallel.placement_strategy == "STRICT_PACK" and ep.engine.kind == "torch"
    assert ep.serving.num_gpus == 1  # GPUs per rank: the replica's 4 bundles hold 1 GPU each
    assert ep.parallel.expert_token_series and ep.serving.user_code_on_main_loop and ep.serving.direct_stream
    sets = {"parallel.expertTokenSeries": "false", "serving.userCodeOnMainLoop": "false",
            "serving.directStream": "false", "serving.replicaStream": "per_request"}
    switched = load_serve_config(yaml.safe_load(serve_config_text(render("gpt-oss-120b-ep4", **sets))))["gptoss"]
    assert not switched.parallel.expert_token_series and not switched.serving.user_code_on_main_loop
    assert not switched.serving.direct_stream and switched.serving.replica_stream == "per_request"
    assert ep.serving.replica_stream == "socket"


def test_vllm_preset_reserves_the_gpus_of_its_worker_pod():
    """builder.vllm_placement reserves TP x DP GPUs for the replica; that must be what the worker
    pod has, and what serving.numGpus says."""
    from cluster.serving.builder import vllm_placement

    objects = render("gpt-oss-120b")
    config = load_serve_config(yaml.safe_load(serve_config_text(objects)))["gptoss"]
    placement = vllm_placement(config)
    assert placement == {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1.0}}
    ray_service, = [o for o in objects if o["kind"] == "RayService"]
    group, = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= placement["ray_actor_options"]["num_gpus"]


def test_engine_signal_autoscaling_is_on_in_the_config_not_in_serve_overrides():
    configs, data = load_rendered("defaults", ("autoscaling",))
    auto = configs["gptoss"].serving.autoscaling
    assert auto.enabled and auto.target_ongoing_per_replica == 16 and auto.target_kv_use == 0.8
    assert "deployments" not in data["applications"][0]


def test_loader_names_the_bad_field_and_the_application():
    data = yaml.safe_load(serve_config_text(render("tiny-cpu")))
    data["applications"][0]["args"]["serving"]["replicas"] = 0
    with pytest.raises(ConfigError, match=r"applications\[0\] \(gptoss\).*serving.replicas must be >= 1"):
        load_serve_config(data)
    data["applications"][0]["args"]["serving"]["replicas"] = 1
    data["applications"][0]["import_path"] = "cluster.serving.nothere:app"
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_serve_config(data)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_frontdoor_configmap_is_the_serve_config_plus_the_ray_address(preset, tmp_path):
    objects = render(preset, ("tls",))
    file_config = yaml.safe_load(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
    serve_args = yaml.safe_load(serve_config_text(objects))["applications"][0]["args"]
    assert file_config.pop("ray") == {"address": "auto"}
    assert file_config == serve_args
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**file_config, "ray": {"address": "auto"}}))
    config = load_config(path, env={})
    assert config.ray.address == "auto" and config.frontdoor.host == "0.0.0.0"


@pytest.mark.slow
def test_tiny_cpu_preset_serve_config_serves_a_request(ray_serving, tiny_checkpoint, tiny_model, tmp_path):
    """Run the rendered tiny preset the way KubeRay does — our builder called with the config's
    args — on the session's Ray under its own application name, put a front door configured from
    the rendered ConfigMap in front of it, and generate through gRPC."""
    import grpc
    from prometheus_client import CollectorRegistry
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from cluster.harmony.tokenizer import load_tokenizer
    from cluster.metrics import FrontdoorMetrics
    from cluster.model.generate import greedy
    from gptoss.v1 import inference_pb2 as pb
    from gptoss.v1 import inference_pb2_grpc
    from tests.conftest import BackgroundFrontdoor

    name = "helm-tiny-cpu"
    objects = render("tiny-cpu")
    data = yaml.safe_load(serve_config_text(objects))
    app = data["applications"][0]
    assert app["args"]["model"]["path"] == "/models/gpt-oss-tiny"
    # The weights volume, as mounted here: the session's tiny checkpoint (the same `checkpoint make
    # --preset tiny` output the preset's init container writes).
    app["args"]["model"]["path"] = str(tiny_checkpoint)
    app["name"] = app["args"]["serving"]["app_name"] = name
    configs = load_serve_config(data)
    application = call_user_app_builder_with_args_if_necessary(resolve_import_path(app["import_path"]), app["args"])
    handle = serve.run(application, name=name, route_prefix=None)
    door = None
    try:
        (tmp_path / "config.yaml").write_text(one(objects, "ConfigMap", "-frontdoor")["data"]["config.yaml"])
        # The generated API-key Secret, as its volume mounts it: a file per tenant.
        keys = {tenant: base64.b64decode(value).decode()
                for tenant, value in one(objects, "Secret", "-api-keys")["data"].items()}
        (tmp_path / "api-keys").mkdir()
        for tenant, key in keys.items():
            (tmp_path / "api-keys" / tenant).write_text(key)
        fd_config = load_config(tmp_path / "config.yaml", env={}, overrides={
            "frontdoor.host": "127.0.0.1", "frontdoor.grpc_port": 0, "frontdoor.metrics_port": -1,
            "frontdoor.http_port": -1, "frontdoor.auth.api_keys_file": str(tmp_path / "api-keys")})
        assert fd_config.frontdoor.model_copy(update=dict(
            host="0.0.0.0", grpc_port=50051, metrics_port=9464, http_port=configs[name].frontdoor.http_port,
            auth=configs[name].frontdoor.auth)) == configs[name].frontdoor
        assert configs[name].frontdoor.auth.api_keys_file == "/etc/gptoss/api-keys"
        metadata = (("authorization", f"Bearer {keys['default']}"),)
        door = BackgroundFrontdoor(handle, fd_config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
        prompt = [200006, 1428, 200008, 13225, 11, 2375, 0, 200007, 200006, 173781]
        with grpc.insecure_channel(door.target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=metadata)
            assert info.model_name == "gpt-oss-tiny"
            request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=8))
            tokens = [t for r in stub.Generate(request, timeout=120, metadata=metadata)
                      if r.HasField("chunk") for t in r.chunk.token_ids]
        assert tokens == greedy(tiny_model, prompt, 8, stop_token_ids=load_tokenizer().message_end_ids)
    finally:
        if door is not None:
            door.close()
        serve.delete(name)


def test_max_replicas_per_node_value_reaches_the_serve_config():
    assert load_rendered("defaults")[0]["gptoss"].serving.max_replicas_per_node == 0
    data = yaml.safe_load(serve_config_text(render("defaults", **{"serving.maxReplicasPerNode": "1"})))
    assert load_serve_config(data)["gptoss"].serving.max_replicas_per_node == 1
