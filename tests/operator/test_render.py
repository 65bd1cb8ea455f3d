"""kubellm.operator.render: LLMServer spec → child manifests (pure, no cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from kubellm.operator import render, spec
from kubellm.operator.render import RenderConfig, RenderError
from kubellm.protocol.settings import ServeSettings
from kubellm.server.cli import build_parser, parse_serve_settings

NAME, NS, UID = "qwen", "team-a", "0b6c7d1e-uid"
CONFIG = RenderConfig(default_image="registry.test/kubellm:1.2.3")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llmserver.yaml"
POD_IP = "10.1.2.3"
PSS_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def llm(**fields: Any) -> spec.LLMServerSpec:
    raw: dict[str, Any] = {"model": {"path": "/models/qwen3"}, "engine": {"replicas": 2}}
    raw.update(fields)
    return spec.LLMServerSpec.model_validate(raw)


def children(server: spec.LLMServerSpec, config: RenderConfig = CONFIG) -> list[dict[str, Any]]:
    return render.render_children(NAME, NS, UID, server, config)


def child(items: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [c for c in items if c["kind"] == kind and c["metadata"]["name"] == name]
    return found


def pod(server: spec.LLMServerSpec, component: str) -> dict[str, Any]:
    kind = "Deployment" if component == "head" else "StatefulSet"
    name = f"{NAME}-{component}"
    template: dict[str, Any] = child(children(server), kind, name)["spec"]["template"]
    return template


def container(server: spec.LLMServerSpec, component: str) -> dict[str, Any]:
    found: dict[str, Any] = pod(server, component)["spec"]["containers"][0]
    return found


def env_values(c: dict[str, Any], rank: int) -> dict[str, str]:
    """The environment the kubelet would give the container (downward API filled in)."""
    out = {}
    for var in c.get("env", []):
        if "value" in var:
            out[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            out[var["name"]] = POD_IP
        elif "apps.kubernetes.io/pod-index" in var["valueFrom"].get("fieldRef", {}).get(
            "fieldPath", ""
        ):
            out[var["name"]] = str(rank)
        elif "secretKeyRef" in var["valueFrom"]:
            out[var["name"]] = "key-1,key-2"
    return out


def parsed(c: dict[str, Any], rank: int = 0) -> ServeSettings:
    """Parse a container's command line with the server's own parser, as the pod would."""
    assert c["command"] == ["kubellm"]
    environ = env_values(c, rank)
    args = [re.sub(r"\$\((\w+)\)", lambda m: environ[m.group(1)], a) for a in c["args"]]
    parser = build_parser()
    return parse_serve_settings(parser, parser.parse_args(args), environ)


# -- the children ----------------------------------------------------------------------------------


def test_children_are_design_note_0004s_table() -> None:
    got = {(c["kind"], c["metadata"]["name"]) for c in children(llm())}
    assert got == {
        ("Deployment", f"{NAME}-head"),
        ("Service", NAME),
        ("Service", f"{NAME}-head-rpc"),
        ("StatefulSet", f"{NAME}-engine"),
        ("Service", f"{NAME}-engine"),
        ("PodDisruptionBudget", f"{NAME}-head"),
        ("PodDisruptionBudget", f"{NAME}-engine"),
        ("NetworkPolicy", f"{NAME}-engine-links"),
    }


def test_every_child_is_owned_namespaced_and_labelled() -> None:
    for c in children(llm()):
        meta = c["metadata"]
        assert meta["namespace"] == NS
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "serving.kubellm.io/v1alpha1",
                "kind": "LLMServer",
                "name": NAME,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "kubellm"
        assert labels["app.kubernetes.io/instance"] == NAME
        assert labels[render.NAME_LABEL] == NAME
        assert labels[render.COMPONENT_LABEL] in {"head", "engine"}
        assert "finalizers" not in meta


def test_rendering_is_deterministic() -> None:
    a = llm(engine={"replicas": 2, "resources": {"requests": {"memory": "1Gi", "cpu": "2"}}})
    b = llm(engine={"resources": {"requests": {"cpu": "2", "memory": "1Gi"}}, "replicas": 2})
    first = json.dumps(children(a))
    assert first == json.dumps(children(a))
    assert first == json.dumps(children(b))
    kinds = [(c["kind"], c["metadata"]["name"]) for c in children(a)]
    assert kinds == sorted(kinds)


def test_selectors_match_pod_labels() -> None:
    items = children(llm())
    for kind, name, component in (
        ("Deployment", f"{NAME}-head", "head"),
        ("StatefulSet", f"{NAME}-engine", "engine"),
    ):
        obj = child(items, kind, name)["spec"]
        selector = obj["selector"]["matchLabels"]
        assert selector == render.selector_labels(NAME, component)
        assert selector.items() <= obj["template"]["metadata"]["labels"].items()
    status_selector = dict(part.split("=") for part in render.selector(NAME).split(","))
    assert status_selector == render.selector_labels(NAME, "engine")
    assert render.url(NAME, NS) == f"http://{NAME}.{NS}.svc:8000/v1"


# -- spec hash -------------------------------------------------------------------------------------


def test_spec_hash_is_stable_and_tracks_changes() -> None:
    base = render.spec_hash(llm())
    assert base == render.spec_hash(llm())
    assert re.fullmatch(r"[0-9a-f]{16}", base)  # a valid label value
    assert render.spec_hash(llm(maxModelLen=1024)) != base
    assert render.spec_hash(llm(engine={"maxReplicas": 3})) != base
    # scaling changes no pod: the replica counts are not in the hash
    assert render.spec_hash(llm(engine={"replicas": 3})) == base
    assert render.spec_hash(llm(engine={"replicas": 0}, head={"replicas": 2})) == base
    for component in ("head", "engine"):
        labels = pod(llm(), component)["metadata"]["labels"]
        assert labels[render.SPEC_HASH_LABEL] == base


# -- probes and timing (R10, R14, R15) -------------------------------------------------------------


@pytest.mark.parametrize("startup", [31, 61, 900, 3601])
@pytest.mark.parametrize("component", ["head", "engine"])
def test_probes(startup: int, component: str) -> None:
    c = container(llm(startupTimeoutSeconds=startup), component)
    start, live, ready = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert start["httpGet"]["path"] == "/health" == live["httpGet"]["path"]
    assert ready["httpGet"]["path"] == "/ready"
    assert start["failureThreshold"] * start["periodSeconds"] >= startup
    assert (start["failureThreshold"] - 1) * start["periodSeconds"] < startup  # not far beyond
    for probe in (start, live, ready):
        assert "initialDelaySeconds" not in probe
        assert probe["httpGet"]["port"] == "http"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]


@pytest.mark.parametrize("shutdown", [0, 30, 599])
@pytest.mark.parametrize("component", ["head", "engine"])
def test_grace_period_covers_prestop_and_drain(shutdown: int, component: str) -> None:
    server = llm(shutdownTimeoutSeconds=shutdown)
    template = pod(server, component)
    c = template["spec"]["containers"][0]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5
    assert template["spec"]["terminationGracePeriodSeconds"] > shutdown + pre_stop + 5
    assert parsed(c).frontend.shutdown_timeout == shutdown


def test_deployment_deadline_exceeds_startup() -> None:
    deployment = child(children(llm(startupTimeoutSeconds=1200)), "Deployment", f"{NAME}-head")
    assert deployment["spec"]["progressDeadlineSeconds"] > 1200
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


# -- security (R27) --------------------------------------------------------------------------------


def check_restricted(template: dict[str, Any]) -> None:
    """Pod Security Standards *restricted*, plus our extras."""
    podspec = template["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not podspec.get(key), key
    assert podspec["automountServiceAccountToken"] is False
    assert podspec["enableServiceLinks"] is False  # KUBELLM_PORT from a Service named kubellm
    psc = podspec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for volume in podspec["volumes"]:
        kinds = set(volume) - {"name"}
        assert kinds <= PSS_VOLUMES, volume
    mounts_by_volume = {v["name"]: v for v in podspec["volumes"]}
    for c in podspec["containers"] + podspec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged") is not True
        assert "hostPort" not in json.dumps(c.get("ports", []))
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in mounts_by_volume
    main = podspec["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert "emptyDir" in mounts_by_volume[mounts["/tmp"]]
    assert mounts_by_volume[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize(
    "model",
    [
        {"path": "/models/m"},
        {"pvc": {"claimName": "models", "subPath": "qwen"}},
        {"huggingFace": {"id": "Qwen/Qwen3-0.6B"}},
    ],
)
def test_pods_are_restricted(model: dict[str, Any]) -> None:
    server = llm(model=model)
    for component in ("head", "engine"):
        check_restricted(pod(server, component))


# -- resources and scheduling ----------------------------------------------------------------------


def test_gpus_per_pod_sets_the_engine_gpu_limit() -> None:
    server = llm(
        engine={"replicas": 1, "gpusPerPod": 2, "resources": {"requests": {"cpu": "4"}}},
        head={"resources": {"limits": {"memory": "2Gi"}}},
    )
    engine = container(server, "engine")
    assert engine["resources"] == {"requests": {"cpu": "4"}, "limits": {"nvidia.com/gpu": "2"}}
    assert parsed(engine).engine.device == "auto"
    head = container(server, "head")
    assert head["resources"] == {"limits": {"memory": "2Gi"}}


def test_cpu_engines_get_no_gpu_and_run_on_cpu() -> None:
    engine = container(llm(engine={"replicas": 1, "gpusPerPod": 0}), "engine")
    assert "nvidia.com/gpu" not in json.dumps(engine.get("resources", {}))
    assert parsed(engine).engine.device == "cpu"


def test_gpus_as_resources_are_refused() -> None:
    server = llm(engine={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
    with pytest.raises(RenderError, match="gpusPerPod"):
        children(server)


def test_scheduling_applies_to_engines_and_priority_to_both() -> None:
    server = llm(
        scheduling={
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "llm",
        }
    )
    engine, head = pod(server, "engine")["spec"], pod(server, "head")["spec"]
    assert engine["nodeSelector"] == {"gpu": "h100"}
    assert engine["tolerations"][0]["key"] == "gpu"
    assert engine["affinity"] == {"nodeAffinity": {}}
    assert engine["priorityClassName"] == head["priorityClassName"] == "llm"
    assert not {"nodeSelector", "tolerations", "affinity"} & head.keys()


def test_images() -> None:
    assert container(llm(), "head")["image"] == CONFIG.default_image
    assert container(llm(image="a:1"), "engine")["image"] == "a:1"
    server = llm(image="a:1", engine={"image": "b:2"})
    assert (container(server, "head")["image"], container(server, "engine")["image"]) == (
        "a:1",
        "b:2",
    )


# -- arguments through the server's parser ---------------------------------------------------------


def test_head_args_parse_back_through_the_server_parser() -> None:
    server = llm(
        servedModelName="qwen3",
        maxModelLen=4096,
        head={"apiServersPerPod": 3},
        engine={
            "replicas": 2,
            "maxReplicas": 4,
            "extraArgs": ["--max-num-seqs", "128", "--dtype", "float32"],
        },
    )
    settings = parsed(container(server, "head"))
    p = settings.parallel
    assert (p.data_parallel_size, p.data_parallel_size_local, p.api_server_count) == (4, 0, 3)
    assert not p.headless and p.remote_engines
    assert p.data_parallel_address == POD_IP
    assert p.data_parallel_rpc_port == CONFIG.rpc_port
    assert p.deployment_revision == render.spec_hash(server)
    assert p.min_ready_engines == 1
    assert settings.engine.model == "/models/qwen3"
    assert settings.engine.max_model_len == 4096
    assert settings.engine.max_num_seqs == 128 and settings.engine.dtype == "float32"
    assert settings.frontend.served_model_name == ("qwen3",)
    assert settings.frontend.port == 8000


@pytest.mark.parametrize("rank", [0, 3])
def test_engine_args_parse_back_with_the_rank_from_the_pod_index(rank: int) -> None:
    server = llm(engine={"replicas": 1, "maxReplicas": 4, "extraArgs": ["--dtype", "float32"]})
    c = container(server, "engine")
    assert "--data-parallel-start-rank" not in c["args"]
    settings = parsed(c, rank=rank)
    p = settings.parallel
    assert p.headless and p.api_servers == 0
    assert (p.data_parallel_size, p.local_engines, p.data_parallel_start_rank) == (4, 1, rank)
    assert p.data_parallel_address == f"{NAME}-head-rpc"
    assert p.deployment_revision == parsed(container(server, "head")).parallel.deployment_revision
    assert settings.engine.dtype == "float32"  # extra args reach engines too


def test_default_served_model_name_is_the_object_name() -> None:
    assert parsed(container(llm(), "head")).frontend.served_model_name == (NAME,)


def test_no_engines_keeps_a_valid_head() -> None:
    server = llm(engine={"replicas": 0}, head={"replicas": 2})
    items = children(server)
    assert child(items, "StatefulSet", f"{NAME}-engine")["spec"]["replicas"] == 0
    assert child(items, "Deployment", f"{NAME}-head")["spec"]["replicas"] == 2
    assert parsed(container(server, "head")).parallel.data_parallel_size == 8  # maxReplicas


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data-parallel-size", "3"],
            "must not set --data-parallel-size: it comes from spec.engine.maxReplicas",
        ),
        (["--port", "9000"], "must not set --port"),
        (["/other/model"], "must not set --model"),
        (["--api-key", "secret"], "spec.apiKeySecretRef"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--dtype", "int3"], "invalid choice"),
    ],
)
def test_bad_extra_args_are_refused_with_a_message(extra: list[str], message: str) -> None:
    with pytest.raises(RenderError) as info:
        children(llm(engine={"extraArgs": extra}))
    assert message in str(info.value)
    assert str(info.value).startswith("spec.engine.extraArgs")


# -- env, model sources, API key -------------------------------------------------------------------


def test_env_is_sorted_and_reserved_names_are_refused() -> None:
    server = llm(engine={"env": [{"name": "ZED", "value": "1"}, {"name": "ALPHA", "value": "2"}]})
    names = [v["name"] for v in container(server, "engine")["env"]]
    assert names == sorted(names) and {"ZED", "ALPHA"} <= set(names)
    assert "ZED" not in [v["name"] for v in container(server, "head")["env"]]
    with pytest.raises(RenderError, match="KUBELLM_DATA_PARALLEL_START_RANK"):
        children(llm(engine={"env": [{"name": "KUBELLM_DATA_PARALLEL_START_RANK", "value": "1"}]}))


def test_api_key_comes_from_the_secret_on_the_head() -> None:
    server = llm(apiKeySecretRef={"name": "keys", "key": "api-key"})
    head = container(server, "head")
    (var,) = [v for v in head["env"] if v["name"] == "KUBELLM_API_KEY"]
    assert var["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "api-key"}}
    assert parsed(head).frontend.api_key == ("key-1", "key-2")
    assert "secret" not in " ".join(head["args"]).lower()
    assert "KUBELLM_API_KEY" not in json.dumps(container(server, "engine"))


def test_pvc_model_is_mounted_read_only() -> None:
    server = llm(model={"pvc": {"claimName": "models", "subPath": "qwen3"}})
    for component in ("head", "engine"):
        template = pod(server, component)["spec"]
        (volume,) = [v for v in template["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        c = template["containers"][0]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount == {
            "name": volume["name"],
            "mountPath": "/models",
            "readOnly": True,
            "subPath": "qwen3",
        }
        assert parsed(c).engine.model == "/models"


def test_path_model_needs_no_volume() -> None:
    template = pod(llm(), "engine")["spec"]
    assert {v["name"] for v in template["volumes"]} == {"tmp", "cache", "dshm"}
    assert "initContainers" not in template


def test_hugging_face_model_is_fetched_by_an_init_container() -> None:
    server = llm(model={"huggingFace": {"id": "Qwen/Qwen3-0.6B", "revision": "v1"}})
    for component in ("head", "engine"):
        template = pod(server, component)["spec"]
        (init,) = template["initContainers"]
        assert init["command"] == ["kubellm"]
        assert init["args"][:6] == [
            "fetch-model", "Qwen/Qwen3-0.6B", "--revision", "v1", "--dest", "/models"
        ]  # fmt: skip
        # API servers read only the config and tokenizer: the head skips the weights
        assert ("--config-only" in init["args"]) == (component == "head")
        assert "--token-file" not in init["args"]
        assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "model", "emptyDir": {}} in template["volumes"]
        main = template["containers"][0]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in main["volumeMounts"]
        assert parsed(main).engine.model == "/models"
        # the very parser of `kubellm` accepts what the init container runs
        args = build_parser().parse_args(init["args"])
        assert (args.command, args.repo_id, args.revision) == (
            "fetch-model",
            "Qwen/Qwen3-0.6B",
            "v1",
        )


def test_hugging_face_token_endpoint_and_proxy_reach_only_the_fetch_step() -> None:
    source = {
        "id": "org/private",
        "tokenSecretRef": {"name": "hf", "key": "token"},
        "endpoint": "http://hub-mirror.infra:8080",
    }
    server = llm(
        model={"huggingFace": source}, engine={"env": [{"name": "HTTPS_PROXY", "value": "p:3128"}]}
    )
    for component in ("head", "engine"):
        template = pod(server, component)["spec"]
        (init,) = template["initContainers"]
        assert init["args"][-2:] == ["--token-file", "/var/run/secrets/kubellm/hf/token"]
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env["HF_ENDPOINT"] == "http://hub-mirror.infra:8080"
        assert env["HTTPS_PROXY"] == "p:3128" and "HF_TOKEN" not in env
        (volume,) = [v for v in template["volumes"] if v["name"] == "hf-token"]
        assert volume["secret"]["secretName"] == "hf"
        assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]
        main = template["containers"][0]
        assert all(m["name"] != "hf-token" for m in main["volumeMounts"])
        assert all(e["name"] != "HF_ENDPOINT" for e in main["env"])


@pytest.mark.parametrize(
    ("name", "hint"),
    [("HF_TOKEN", "tokenSecretRef"), ("HF_ENDPOINT", "huggingFace.endpoint"), ("HOME", "operator")],
)
def test_reserved_env_is_refused_with_what_to_do(name: str, hint: str) -> None:
    server = llm(engine={"env": [{"name": name, "value": "x"}]})
    with pytest.raises(render.RenderError, match=f"must not set {name}: .*{hint}"):
        children(server)


# -- services, PDBs, network policy ----------------------------------------------------------------


@pytest.mark.parametrize("api_servers", [1, 4])
def test_rpc_service_and_network_policy_cover_every_api_server(api_servers: int) -> None:
    items = children(llm(head={"apiServersPerPod": api_servers}))
    rpc = child(items, "Service", f"{NAME}-head-rpc")["spec"]
    ports = sorted(p["port"] for p in rpc["ports"])
    base = CONFIG.rpc_port
    assert ports == list(range(base, base + 2 * api_servers + 1))
    assert all(len(p["name"]) <= 15 for p in rpc["ports"])
    # engines register before the head is ready (it is ready once engines are)
    assert rpc["publishNotReadyAddresses"] is True
    assert rpc["selector"] == render.selector_labels(NAME, "head")
    policy = child(items, "NetworkPolicy", f"{NAME}-engine-links")["spec"]
    assert policy["podSelector"]["matchLabels"] == render.selector_labels(NAME, "head")
    engine_rule, http_rule = policy["ingress"]
    assert engine_rule["from"] == [
        {"podSelector": {"matchLabels": render.selector_labels(NAME, "engine")}}
    ]
    assert engine_rule["ports"] == [
        {"protocol": "TCP", "port": base, "endPort": base + 2 * api_servers}
    ]
    assert http_rule == {"ports": [{"protocol": "TCP", "port": 8000}]}


def test_services_and_pdbs() -> None:
    items = children(llm())
    head = child(items, "Service", NAME)["spec"]
    assert head["ports"] == [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    assert head["selector"] == render.selector_labels(NAME, "head")
    engines = child(items, "Service", f"{NAME}-engine")["spec"]
    assert engines["clusterIP"] == "None"
    sts = child(items, "StatefulSet", f"{NAME}-engine")["spec"]
    assert sts["serviceName"] == f"{NAME}-engine" and sts["replicas"] == 2
    for component in ("head", "engine"):
        pdb = child(items, "PodDisruptionBudget", f"{NAME}-{component}")["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert pdb["selector"]["matchLabels"] == render.selector_labels(NAME, component)


def test_service_monitor_only_when_asked() -> None:
    assert "ServiceMonitor" not in {c["kind"] for c in children(llm())}
    items = children(llm(metrics={"serviceMonitor": True}))
    monitor = child(items, "ServiceMonitor", NAME)["spec"]
    assert monitor["endpoints"] == [{"port": "http", "path": "/metrics"}]


def test_the_example_renders() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    (server,) = [d for d in docs if d.get("kind") == "LLMServer"]
    parsed_spec = spec.LLMServerSpec.model_validate(server["spec"])
    items = render.render_children(server["metadata"]["name"], "default", UID, parsed_spec, CONFIG)
    for component in ("head", "engine"):
        kind = "Deployment" if component == "head" else "StatefulSet"
        workload = child(items, kind, f"{server['metadata']['name']}-{component}")
        settings = parsed(workload["spec"]["template"]["spec"]["containers"][0], rank=1)
        assert settings.parallel.data_parallel_size == parsed_spec.engine.max_replicas
    # rendering does not mutate the spec
    assert parsed_spec == spec.LLMServerSpec.model_validate(server["spec"])
