"""Pure rendering: an LLMServer spec → the manifests of its children (dicts), deterministically.

No I/O and no clock: the same input always gives the same output, so `apply` can compare and
server-side-apply it. What is rendered is design note 0004's table: the head Deployment and its
two Services, the engine StatefulSet and its headless Service, two PodDisruptionBudgets, a
NetworkPolicy (and a ServiceMonitor when asked for). Pod arguments come from
`kubellm.protocol.settings.ServeSettings` through `kubellm.protocol.cli.to_args`, so every flag
is defined in one place and parses back through the server's own parser.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kubellm.operator.render_args import RenderError, engine_settings, head_settings
from kubellm.operator.spec import API_VERSION, KIND, LLMServerSpec, Resources
from kubellm.protocol.cli import env_name, to_args

__all__ = [
    "COMPONENT_LABEL",
    "NAME_LABEL",
    "POD_INDEX_LABEL",
    "SPEC_HASH_LABEL",
    "RenderConfig",
    "RenderError",
    "labels",
    "owner_reference",
    "render_children",
    "selector",
    "selector_labels",
    "spec_hash",
    "url",
]

NAME_LABEL = "serving.kubellm.io/name"
COMPONENT_LABEL = "serving.kubellm.io/component"
SPEC_HASH_LABEL = "serving.kubellm.io/spec-hash"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
GPU_RESOURCE = "nvidia.com/gpu"
CONTAINER = "kubellm"
MODELS_DIR = "/models"
CACHE_DIR = "/var/cache/kubellm"
RESERVED_ENV = {
    "POD_IP": "the operator sets it",
    "HOME": "the operator sets it",
    "XDG_CACHE_HOME": "the operator sets it",
    "HF_HUB_DISABLE_TELEMETRY": "the operator sets it",
    env_name("api_key"): "use spec.apiKeySecretRef",
    env_name("data_parallel_start_rank"): "the operator sets it from the pod ordinal",
    "HF_ENDPOINT": "use spec.model.huggingFace.endpoint",
    "HF_TOKEN": "use spec.model.huggingFace.tokenSecretRef",
}
"""Variables spec.engine.env may not set, and what to do instead."""


@dataclass(frozen=True)
class RenderConfig:
    """Operator-wide settings that are not part of any LLMServer."""

    default_image: str = "ghcr.io/kubellm/kubellm:0.1.0"
    """Image of pods whose spec names none (`kubellm-operator run --default-image`)."""
    rpc_port: int = 29550
    """The head's engine registration port P; API server i uses P+1+2i and P+2+2i."""
    http_port: int = 8000
    """HTTP port of every pod (OpenAI API on heads; /health, /ready, /metrics everywhere)."""
    image_pull_policy: str | None = None
    """imagePullPolicy of the containers; default: Kubernetes' own."""
    pre_stop_sleep_seconds: int = 5
    """preStop sleep, so endpoints drop the pod before it stops accepting requests."""
    probe_period_seconds: int = 10
    """periodSeconds of the startup and liveness probes."""
    shm_size: str = "1Gi"
    """Size limit of the memory-backed /dev/shm."""
    run_as_user: int = 1000
    """UID (and GID) the containers run as."""


# -- names, labels and small helpers used by the status code -------------------------------------


SCALE_FIELDS = (("engine", "replicas"), ("head", "replicas"))
"""Spec fields that only change how many pods run: left out of the spec hash, so scaling
adds or removes pods and restarts none."""


def spec_hash(spec: LLMServerSpec) -> str:
    """A stable 16-hex-digit hash of the spec without its replica counts: the pods' spec-hash
    label and the head/engine `--deployment-revision`, so that any other spec change rolls every
    pod and never mixes revisions, while scaling restarts nothing."""
    data = spec.model_dump(mode="json", by_alias=True)
    for section, field in SCALE_FIELDS:
        data[section].pop(field)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def selector_labels(name: str, component: str) -> dict[str, str]:
    """The immutable selector of one component's pods."""
    return {NAME_LABEL: name, COMPONENT_LABEL: component}


def labels(name: str, component: str) -> dict[str, str]:
    """Labels of every child object (and pod) of one component."""
    return {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "kubellm-operator",
        "app.kubernetes.io/name": "kubellm",
        **selector_labels(name, component),
    }


def selector(name: str) -> str:
    """The engine pods' label selector as a string (status.selector, for the scale subresource)."""
    return f"{NAME_LABEL}={name},{COMPONENT_LABEL}=engine"


def url(name: str, namespace: str, port: int = 8000) -> str:
    """The OpenAI base URL inside the cluster."""
    return f"http://{name}.{namespace}.svc:{port}/v1"


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """Makes the LLMServer the controlling owner: deleting it deletes the child (GC)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(child: str, namespace: str, owner: tuple[str, str], component: str) -> dict[str, Any]:
    return {
        "name": child,
        "namespace": namespace,
        "labels": labels(owner[0], component),
        "ownerReferences": [owner_reference(*owner)],
    }


def _sorted(mapping: dict[str, str]) -> dict[str, str]:
    return {key: mapping[key] for key in sorted(mapping)}


# -- pods ----------------------------------------------------------------------------------------


def model_path(spec: LLMServerSpec) -> str:
    """The model directory `kubellm serve` is given."""
    return spec.model.path if spec.model.path is not None else MODELS_DIR


def _model_volume(spec: LLMServerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts that bring the model in (none for a path inside the image)."""
    source = spec.model
    if source.pvc is not None:
        mount: dict[str, Any] = {"name": "model", "mountPath": MODELS_DIR, "readOnly": True}
        if source.pvc.sub_path:
            mount["subPath"] = source.pvc.sub_path
        claim = {"claimName": source.pvc.claim_name, "readOnly": True}
        return [{"name": "model", "persistentVolumeClaim": claim}], [mount]
    if source.hugging_face is not None:
        mount = {"name": "model", "mountPath": MODELS_DIR, "readOnly": True}
        return [{"name": "model", "emptyDir": {}}], [mount]
    return [], []


HF_TOKEN_DIR = "/var/run/secrets/kubellm/hf"
HF_TOKEN_VOLUME = "hf-token"


def _hf_volumes(spec: LLMServerSpec) -> list[dict[str, Any]]:
    """The token Secret of a huggingFace source, as a volume (only the one key, as "token")."""
    hf = spec.model.hugging_face
    if hf is None or hf.token_secret_ref is None:
        return []
    ref = hf.token_secret_ref
    secret = {
        "secretName": ref.name,
        "items": [{"key": ref.key, "path": "token"}],
        "defaultMode": 0o440,
    }
    return [{"name": HF_TOKEN_VOLUME, "secret": secret}]


def _fetch_container(spec: LLMServerSpec, pod: _Pod, config: RenderConfig) -> dict[str, Any]:
    """The init container of a huggingFace source: `kubellm fetch-model` into the model
    emptyDir. Head pods fetch only what API servers read (config, tokenizer, chat template)."""
    hf = spec.model.hugging_face
    if hf is None:
        raise RenderError("internal: no huggingFace model source")
    args = ["fetch-model", hf.id, "--revision", hf.revision, "--dest", MODELS_DIR]
    if pod.component == "head":
        args.append("--config-only")
    mounts: list[dict[str, Any]] = [
        {"name": "model", "mountPath": MODELS_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        *_user_env(spec),
    ]
    if hf.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf.endpoint})
    if hf.token_secret_ref is not None:
        args += ["--token-file", f"{HF_TOKEN_DIR}/token"]
        mounts.append({"name": HF_TOKEN_VOLUME, "mountPath": HF_TOKEN_DIR, "readOnly": True})
    container = _base_container("fetch-model", pod.image, config)
    container.update(
        {
            "command": ["kubellm"],
            "args": args,
            "env": _env(env),
            "volumeMounts": sorted(mounts, key=lambda m: str(m["mountPath"])),
        }
    )
    return container


def _base_container(name: str, image: str, config: RenderConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.image_pull_policy:
        container["imagePullPolicy"] = config.image_pull_policy
    return container


def _probes(spec: LLMServerSpec, config: RenderConfig) -> dict[str, Any]:
    """startup/liveness on /health, readiness on /ready (R10, R15); no initialDelaySeconds."""
    period = config.probe_period_seconds

    def probe(path: str, **extra: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "timeoutSeconds": 5, **extra}

    return {
        "startupProbe": probe(
            "/health",
            periodSeconds=period,
            failureThreshold=max(1, math.ceil(spec.startup_timeout_seconds / period)),
        ),
        "livenessProbe": probe("/health", periodSeconds=period, failureThreshold=3),
        "readinessProbe": probe("/ready", periodSeconds=5, failureThreshold=2),
    }


def _resources(resources: Resources, gpus: int) -> dict[str, Any]:
    requests, limits = dict(resources.requests), dict(resources.limits)
    if GPU_RESOURCE in requests or GPU_RESOURCE in limits:
        raise RenderError(f"set GPUs with spec.engine.gpusPerPod, not as {GPU_RESOURCE} resources")
    if gpus > 0:
        limits[GPU_RESOURCE] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = _sorted(requests)
    if limits:
        out["limits"] = _sorted(limits)
    return out


def _env(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
    ]
    return sorted(base + extra, key=lambda item: str(item["name"]))


def _user_env(spec: LLMServerSpec) -> list[dict[str, Any]]:
    out = []
    for var in spec.engine.env:
        if var.name in RESERVED_ENV:
            raise RenderError(f"spec.engine.env must not set {var.name}: {RESERVED_ENV[var.name]}")
        out.append({"name": var.name, "value": var.value})
    if len({v["name"] for v in out}) != len(out):
        raise RenderError("spec.engine.env names a variable twice")
    return out


@dataclass(frozen=True)
class _Pod:
    """What differs between head and engine pods."""

    component: str
    image: str
    args: list[str]
    env: list[dict[str, Any]]
    resources: dict[str, Any]


def _main_container(
    spec: LLMServerSpec, config: RenderConfig, pod: _Pod, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    container = _base_container(CONTAINER, pod.image, config)
    container.update(
        {
            "command": ["kubellm"],
            "args": ["serve", *pod.args],
            "env": _env(pod.env),
            "ports": [{"name": "http", "containerPort": config.http_port, "protocol": "TCP"}],
            "lifecycle": {"preStop": {"sleep": {"seconds": config.pre_stop_sleep_seconds}}},
            "volumeMounts": sorted(
                [
                    *mounts,
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "cache", "mountPath": CACHE_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                key=lambda m: str(m["mountPath"]),
            ),
            **_probes(spec, config),
        }
    )
    if pod.resources:
        container["resources"] = pod.resources
    return container


def _pod_template(
    name: str, spec: LLMServerSpec, config: RenderConfig, pod: _Pod
) -> dict[str, Any]:
    """Restricted pod (R27), grace period = drain + preStop + 10 s (R14)."""
    volumes, mounts = _model_volume(spec)
    uid = config.run_as_user
    grace = spec.shutdown_timeout_seconds + config.pre_stop_sleep_seconds + 10
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # a Service named "kubellm" would set KUBELLM_PORT
        "terminationGracePeriodSeconds": grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_main_container(spec, config, pod, mounts)],
        "volumes": sorted(
            [
                *volumes,
                *_hf_volumes(spec),
                {"name": "tmp", "emptyDir": {}},
                {"name": "cache", "emptyDir": {}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
            ],
            key=lambda v: str(v["name"]),
        ),
    }
    if spec.model.hugging_face is not None:
        pod_spec["initContainers"] = [_fetch_container(spec, pod, config)]
    _schedule(pod_spec, spec, pod.component)
    pod_labels = {**labels(name, pod.component), SPEC_HASH_LABEL: spec_hash(spec)}
    return {"metadata": {"labels": pod_labels}, "spec": pod_spec}


def _schedule(pod_spec: dict[str, Any], spec: LLMServerSpec, component: str) -> None:
    """Node placement applies to engine pods; the priority class to both."""
    scheduling = spec.scheduling
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if component != "engine":
        return
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = _sorted(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in scheduling.tolerations]
    if scheduling.affinity:
        pod_spec["affinity"] = dict(scheduling.affinity)


def _head_pod(name: str, spec: LLMServerSpec, config: RenderConfig) -> _Pod:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append(
            {
                "name": env_name("api_key"),
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    settings = head_settings(name, spec, config.http_port, config.rpc_port, spec_hash(spec))
    return _Pod(
        component="head",
        image=spec.image or config.default_image,
        args=to_args(settings),
        env=env,
        resources=_resources(spec.head.resources, 0),
    )


def _engine_pod(name: str, spec: LLMServerSpec, config: RenderConfig) -> _Pod:
    rank = {
        "name": env_name("data_parallel_start_rank"),
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}},
    }
    settings = engine_settings(
        f"{name}-head-rpc", spec, config.http_port, config.rpc_port, spec_hash(spec)
    )
    return _Pod(
        component="engine",
        image=spec.engine.image or spec.image or config.default_image,
        args=to_args(settings),
        env=[rank, *_user_env(spec)],
        resources=_resources(spec.engine.resources, spec.engine.gpus_per_pod),
    )


# -- workloads and services ----------------------------------------------------------------------


def _head_deployment(
    name: str, ns: str, uid: str, spec: LLMServerSpec, config: RenderConfig
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(f"{name}-head", ns, (name, uid), "head"),
        "spec": {
            "replicas": spec.head.replicas,
            "selector": {"matchLabels": selector_labels(name, "head")},
            # One coordinator at a time: engines register with a single head (design 0004).
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 120,
            "revisionHistoryLimit": 3,
            "template": _pod_template(name, spec, config, _head_pod(name, spec, config)),
        },
    }


def _engine_statefulset(
    name: str, ns: str, uid: str, spec: LLMServerSpec, config: RenderConfig
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(f"{name}-engine", ns, (name, uid), "engine"),
        "spec": {
            "replicas": spec.engine.replicas,
            "serviceName": f"{name}-engine",
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name, "engine")},
            "template": _pod_template(name, spec, config, _engine_pod(name, spec, config)),
        },
    }


def _rpc_ports(spec: LLMServerSpec, config: RenderConfig) -> list[tuple[str, int]]:
    """Registration port P, then requests P+1+2i and outputs P+2+2i of API server i."""
    base = config.rpc_port
    ports = [("reg", base)]
    for i in range(spec.head.api_servers_per_pod):
        ports += [(f"req-{i}", base + 1 + 2 * i), (f"out-{i}", base + 2 + 2 * i)]
    return ports


def _service(
    child: str,
    meta: tuple[str, str, str],
    component: str,
    ports: list[tuple[str, int]],
    **extra: Any,
) -> dict[str, Any]:
    name, ns, uid = meta
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(child, ns, (name, uid), component),
        "spec": {
            "selector": selector_labels(name, component),
            "ports": [
                {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                for port_name, port in ports
            ],
            **extra,
        },
    }


def _services(
    name: str, ns: str, uid: str, spec: LLMServerSpec, config: RenderConfig
) -> list[dict[str, Any]]:
    meta = (name, ns, uid)
    http = [("http", config.http_port)]
    return [
        _service(name, meta, "head", http, type="ClusterIP"),
        # Engines must reach a head that is not ready yet (it is ready once engines are).
        _service(
            f"{name}-head-rpc",
            meta,
            "head",
            _rpc_ports(spec, config),
            type="ClusterIP",
            publishNotReadyAddresses=True,
        ),
        _service(
            f"{name}-engine", meta, "engine", http, clusterIP="None", publishNotReadyAddresses=True
        ),
    ]


def _pdb(name: str, ns: str, uid: str, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(f"{name}-{component}", ns, (name, uid), component),
        "spec": {
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": selector_labels(name, component)},
        },
    }


def _network_policy(
    name: str, ns: str, uid: str, spec: LLMServerSpec, config: RenderConfig
) -> dict[str, Any]:
    """Head engine-link ports only from this LLMServer's engines; HTTP from anywhere."""
    ports = _rpc_ports(spec, config)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(f"{name}-engine-links", ns, (name, uid), "head"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name, "head")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": selector_labels(name, "engine")}}],
                    "ports": [{"protocol": "TCP", "port": ports[0][1], "endPort": ports[-1][1]}],
                },
                {"ports": [{"protocol": "TCP", "port": config.http_port}]},
            ],
        },
    }


def _service_monitor(name: str, ns: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(name, ns, (name, uid), "head"),
        "spec": {
            "selector": {"matchLabels": {NAME_LABEL: name}},
            "endpoints": [{"port": "http", "path": "/metrics"}],
        },
    }


def render_children(
    name: str, namespace: str, uid: str, spec: LLMServerSpec, config: RenderConfig
) -> list[dict[str, Any]]:
    """Every child manifest of one LLMServer, sorted by (kind, name).

    Raises RenderError (a ValueError) with a message naming the spec field when the spec
    cannot be rendered (e.g. engine.extraArgs setting a flag the operator owns).
    """
    children = [
        _head_deployment(name, namespace, uid, spec, config),
        _engine_statefulset(name, namespace, uid, spec, config),
        *_services(name, namespace, uid, spec, config),
        _pdb(name, namespace, uid, "head"),
        _pdb(name, namespace, uid, "engine"),
        _network_policy(name, namespace, uid, spec, config),
    ]
    if spec.metrics.service_monitor:
        children.append(_service_monitor(name, namespace, uid))
    return sorted(children, key=lambda c: (c["kind"], c["metadata"]["name"]))
