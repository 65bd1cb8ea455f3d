"""Issue 4's "Done when", on a real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler; pods simulated by kwok):

1. `helm install` charts/kubellm (CRD, ServiceAccount, RBAC, the operator Deployment);
2. run `kubellm-operator run` here, as a local process, with a token of the chart's
   ServiceAccount, so the chart's RBAC is what the operator gets;
3. `kubectl apply -f examples/llmserver.yaml` → head and engine workloads and services, Ready;
4. `kubectl get llms` shows the printer columns; `kubectl scale` changes the engine StatefulSet
   and restarts no pod;
   a spec change rolls the pods (spec-hash label); `kubectl delete` garbage-collects everything;
5. invalid manifests are refused by the API server with messages a user understands.

On failure the objects, events and the operator's log are printed.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]
from cluster import (  # type: ignore[import-not-found, unused-ignore]
    Cluster,
    ClusterError,
    record_timing,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubellm"
EXAMPLE = REPO / "examples" / "llmserver.yaml"
OPERATOR = Path(sys.executable).parent / "kubellm-operator"
RELEASE = "kubellm"
RELEASE_NS = "kubellm-system"
NS = "e2e"
LABEL_NAME = "serving.kubellm.io/name"
HASH_LABEL = "serving.kubellm.io/spec-hash"
PORT_FLAGS = ("--liveness", "--metrics")
"""Chart flags that open ports in the pod; left out of the local process."""

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")


# -- the stack: chart installed, operator running ---------------------------------------------------


@dataclass
class Operator:
    """`kubellm-operator run` as a local process, its output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"kubellm-operator exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


@dataclass
class Stack:
    cluster: Cluster
    operator: Operator
    helm: Path
    sa_kubeconfig: Path

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 180) -> T:
        """wait_for, failing at once (with its log) when the operator has died."""

        def checked() -> T | None:
            self.operator.check_alive()
            return probe()

        return wait_for(what, checked, timeout=timeout, interval=1.0)


def _helm_bin() -> Path:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "helm-bin.sh")], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ClusterError(f"scripts/helm-bin.sh failed ({proc.returncode}):\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "helm"


def _helm(cluster: Cluster, helm: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(helm), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _release_objects(cluster: Cluster, helm: Path) -> list[dict[str, Any]]:
    manifest = _helm(cluster, helm, "get", "manifest", RELEASE, "--namespace", RELEASE_NS)
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def _token_kubeconfig(cluster: Cluster, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a bound token)."""
    token = cluster.kubectl(
        "create", "token", service_account, "--namespace", RELEASE_NS, "--duration", "2h"
    ).strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json"))
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": service_account}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _operator_args(objects: list[dict[str, Any]]) -> list[str]:
    """The chart's `kubellm-operator` arguments, without the flags that open ports."""
    for obj in objects:
        if obj.get("kind") == "Deployment":
            container = obj["spec"]["template"]["spec"]["containers"][0]
            args = [str(a) for a in container.get("args", [])]
            return [a for a in args if not a.startswith(PORT_FLAGS)]
    raise AssertionError("the chart rendered no operator Deployment")


def _start_operator(args: list[str], kubeconfig: Path, log: Path) -> Operator:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(OPERATOR), *args, "--kubeconfig", str(kubeconfig)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Operator(proc=proc, log=log)


@pytest.fixture(scope="module")
def stack(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The chart installed with helm, the operator running locally as its ServiceAccount."""
    cluster = k8s_cluster
    tmp = tmp_path_factory.mktemp("e2e")
    helm = _helm_bin()
    operator: Operator | None = None
    try:
        _helm(
            cluster, helm, "install", RELEASE, str(CHART), "--namespace", RELEASE_NS,
            "--create-namespace", "--wait", "--timeout", "3m",
        )  # fmt: skip
        objects = _release_objects(cluster, helm)
        accounts = [o["metadata"]["name"] for o in objects if o.get("kind") == "ServiceAccount"]
        assert len(accounts) == 1, f"expected one ServiceAccount in the release, got {accounts}"
        sa_kubeconfig = _token_kubeconfig(cluster, accounts[0], tmp / "operator.kubeconfig")
        cluster.run("delete", "namespace", NS, "--ignore-not-found", "--wait=true")
        cluster.kubectl("create", "namespace", NS)
        operator = _start_operator(_operator_args(objects), sa_kubeconfig, tmp / "operator.log")
        yield Stack(cluster=cluster, operator=operator, helm=helm, sa_kubeconfig=sa_kubeconfig)
    finally:
        if operator is not None:
            operator.stop()
        cluster.run("delete", "namespace", NS, "--ignore-not-found", "--wait=false", check=False)
        subprocess.run(
            [str(helm), "--kubeconfig", str(cluster.kubeconfig), "uninstall", RELEASE,
             "--namespace", RELEASE_NS, "--wait", "--timeout", "2m"],
            capture_output=True, env=cluster.env, check=False, timeout=180,
        )  # fmt: skip


@pytest.fixture(autouse=True)
def dump_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print objects, events and the operator's log when the test failed."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "stack" in request.fixturenames:
        stack: Stack = request.getfixturevalue("stack")
        print("=== objects and events ===")
        print(stack.cluster.debug_dump())
        print("=== kubellm-operator log ===")
        print(stack.operator.log_tail(20000))


# -- helpers ---------------------------------------------------------------------------------------


def _example() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    servers = [d for d in docs if d.get("kind") == "LLMServer"]
    assert len(servers) == 1, f"{EXAMPLE} should hold one LLMServer, found {len(servers)}"
    return servers[0]


def _get(stack: Stack, *what: str) -> dict[str, Any] | None:
    proc = stack.cluster.run("get", *what, "--namespace", NS, "-o", "json", check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise ClusterError(proc.stderr)
    obj: dict[str, Any] = json.loads(proc.stdout)
    return obj


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def _children(name: str) -> list[tuple[str, str]]:
    """Design note 0004's table: (kind, name) of every child of LLMServer `name`."""
    return [
        ("deployment", f"{name}-head"),
        ("service", name),
        ("service", f"{name}-head-rpc"),
        ("statefulset", f"{name}-engine"),
        ("service", f"{name}-engine"),
        ("poddisruptionbudget", f"{name}-head"),
        ("poddisruptionbudget", f"{name}-engine"),
        ("networkpolicy", f"{name}-engine-links"),
    ]


def _ready_server(stack: Stack, name: str, timeout: float = 240) -> dict[str, Any]:
    """The LLMServer once Ready=True for its current generation."""

    def probe() -> dict[str, Any] | None:
        obj = _get(stack, f"llmservers/{name}")
        status = (obj or {}).get("status") or {}
        current = (
            obj is not None and status.get("observedGeneration") == (obj["metadata"]["generation"])
        )
        return obj if current and _condition(obj, "Ready").get("status") == "True" else None

    return stack.wait(f"LLMServer {name} Ready", probe, timeout=timeout)


def _rolled_out(stack: Stack, name: str, replicas: int) -> dict[str, Any] | None:
    """The engine StatefulSet when all `replicas` pods run the current revision and are ready."""
    sts = _get(stack, f"statefulset/{name}-engine")
    if sts is None or sts["spec"].get("replicas") != replicas:
        return None
    st = sts.get("status") or {}
    done = (
        st.get("observedGeneration") == sts["metadata"]["generation"]
        and st.get("readyReplicas", 0) == replicas
        and st.get("updatedReplicas", 0) == replicas
        and st.get("currentRevision") == st.get("updateRevision")
    )
    return sts if done else None


def _pods(stack: Stack, name: str, component: str) -> list[dict[str, Any]]:
    selector = f"{LABEL_NAME}={name},serving.kubellm.io/component={component}"
    pods = stack.cluster.get_json("pods", "--namespace", NS, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


# -- the scenario ----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_operator_serves_scales_rolls_and_deletes(stack: Stack) -> None:
    server = _example()
    name = server["metadata"]["name"]
    _check_operator_rbac(stack)
    started = time.monotonic()
    stack.cluster.kubectl("apply", "--namespace", NS, "-f", str(EXAMPLE))
    status = _wait_children_and_ready(stack, server)
    record_timing(stack.cluster, "apply_to_ready_s", time.monotonic() - started)
    _check_printer_columns(stack, server, status)
    _scale_restarts_nothing(stack, name)
    _spec_change_rolls(stack, server, 2)
    _delete_collects_everything(stack, name)


def _check_operator_rbac(stack: Stack) -> None:
    """The chart's RBAC is what the operator gets: it may manage LLMServers, not read Secrets."""

    def can_i(*args: str) -> str:
        kubeconfig = ["--kubeconfig", str(stack.sa_kubeconfig)]
        return stack.cluster.run(*kubeconfig, "auth", "can-i", *args, check=False).stdout.strip()

    assert can_i("patch", "llmservers.serving.kubellm.io", "-n", NS) == "yes"
    assert can_i("create", "statefulsets.apps", "-n", NS) == "yes"
    assert can_i("get", "secrets", "--all-namespaces") == "no"


def _wait_children_and_ready(stack: Stack, server: dict[str, Any]) -> dict[str, Any]:
    """Children appear, each owned by the LLMServer (GC depends on it); then Ready. The status."""
    name = server["metadata"]["name"]
    engines = int(server["spec"].get("engine", {}).get("replicas", 1))
    uid = stack.wait("the LLMServer", lambda: _get(stack, f"llmservers/{name}"))["metadata"]["uid"]
    for kind, child in _children(name):
        obj = stack.wait(f"{kind}/{child}", partial(_get, stack, f"{kind}/{child}"))
        owners = obj["metadata"].get("ownerReferences") or []
        assert [(o["uid"], o.get("controller")) for o in owners] == [(uid, True)], (kind, child)
    server_obj = _ready_server(stack, name)
    status: dict[str, Any] = server_obj["status"]
    assert status["engine"] == {"ready": engines, "desired": engines}
    assert status["head"]["ready"] == status["head"]["desired"] >= 1
    assert status["url"] == f"http://{name}.{NS}.svc:8000/v1"
    assert stack.wait("engines ready", partial(_rolled_out, stack, name, engines))
    assert not server_obj["metadata"].get("finalizers"), "no finalizers (R26)"
    return status


def _check_printer_columns(stack: Stack, server: dict[str, Any], status: dict[str, Any]) -> None:
    """`kubectl get llms`: the printer columns, and Ready."""
    name = server["metadata"]["name"]
    table = stack.cluster.kubectl("get", "llms", "--namespace", NS).splitlines()
    assert table[0].split() == ["NAME", "READY", "MODEL", "ENGINES", "URL", "AGE"], table
    row = next(line.split() for line in table[1:] if line.split()[0] == name)
    served = server["spec"].get("servedModelName") or name
    engines = str(status["engine"]["ready"])
    assert row[1:5] == ["True", served, engines, status["url"]], table


def _scale_engines(stack: Stack, name: str, replicas: int) -> None:
    """`kubectl scale` goes through the scale subresource to the engine StatefulSet."""
    stack.cluster.kubectl("scale", f"llms/{name}", "--namespace", NS, f"--replicas={replicas}")
    stack.wait(f"{replicas} engines rolled out", partial(_rolled_out, stack, name, replicas))
    path = f"/apis/serving.kubellm.io/v1alpha1/namespaces/{NS}/llmservers/{name}/scale"
    scale = json.loads(stack.cluster.kubectl("get", "--raw", path))
    assert scale["spec"]["replicas"] == replicas
    server_obj = _ready_server(stack, name)
    assert server_obj["status"]["engine"] == {"ready": replicas, "desired": replicas}
    assert scale["status"]["selector"] == server_obj["status"]["selector"]
    assert len(_pods(stack, name, "engine")) == replicas


def _uids(stack: Stack, name: str, component: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(stack, name, component)}


def _scale_restarts_nothing(stack: Stack, name: str) -> None:
    """Scaling up then down adds and removes engine pods; the pods that stay are the same pods
    (no restart, no model reload), and the head is untouched. Beyond maxReplicas is refused."""
    head, engines = _uids(stack, name, "head"), _uids(stack, name, "engine")
    _scale_engines(stack, name, 3)
    after_up = _uids(stack, name, "engine")
    assert {pod: after_up[pod] for pod in engines} == engines
    _scale_engines(stack, name, 2)
    assert _uids(stack, name, "engine") == engines
    assert _uids(stack, name, "head") == head
    proc = stack.cluster.run(
        "scale", f"llms/{name}", "--namespace", NS, "--replicas=5", check=False
    )
    assert proc.returncode != 0, "scaling beyond engine.maxReplicas was accepted"
    assert "must not exceed engine.maxReplicas" in proc.stderr, proc.stderr
    assert _get(stack, f"statefulset/{name}-engine")["spec"]["replicas"] == 2  # type: ignore[index]


def _spec_change_rolls(stack: Stack, server: dict[str, Any], replicas: int) -> None:
    """A spec change rolls the engine pods: a new spec-hash label on the template and pods."""
    name = server["metadata"]["name"]
    before = _get(stack, f"statefulset/{name}-engine") or {}
    old_hash = before["spec"]["template"]["metadata"]["labels"][HASH_LABEL]
    patch = json.dumps({"spec": {"engine": {"extraArgs": ["--max-num-seqs", "17"]}}})
    stack.cluster.kubectl("patch", f"llms/{name}", "--namespace", NS, "--type=merge", "-p", patch)

    def rolled() -> str | None:
        sts = _rolled_out(stack, name, replicas)
        new_hash = sts["spec"]["template"]["metadata"]["labels"][HASH_LABEL] if sts else old_hash
        pods = _pods(stack, name, "engine")
        fresh = [p for p in pods if p["metadata"]["labels"].get(HASH_LABEL) == new_hash]
        done = new_hash != old_hash and len(pods) == len(fresh) == replicas
        return str(new_hash) if done else None

    new_hash = stack.wait("the engines to roll", rolled)
    # Who deleted the old pods is not asserted here: kwok marks pods Ready at once, so the
    # StatefulSet controller's own rolling update can replace both before the operator lists
    # them (a race CI hit once). The operator's all-at-once replacement is covered by
    # tests/operator/test_rollout.py; here, every engine pod must end on the new spec.
    for pod in _pods(stack, name, "engine"):
        assert pod["metadata"]["labels"][HASH_LABEL] == new_hash
        assert "--max-num-seqs 17" in " ".join(_container_args(pod)), _container_args(pod)
    _ready_server(stack, name)


def _delete_collects_everything(stack: Stack, name: str) -> None:
    """`kubectl delete`: the garbage collector removes every child and pod."""
    stack.cluster.kubectl("delete", f"llms/{name}", "--namespace", NS, "--timeout=60s")

    def gone() -> bool:
        left = [f"{k}/{c}" for k, c in _children(name) if _get(stack, f"{k}/{c}") is not None]
        left += [p["metadata"]["name"] for p in _pods(stack, name, "head")]
        left += [p["metadata"]["name"] for p in _pods(stack, name, "engine")]
        return not left

    stack.wait("garbage collection of every child", gone, timeout=180)


def _container_args(pod: dict[str, Any]) -> list[str]:
    container = pod["spec"]["containers"][0]
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


# -- invalid manifests -----------------------------------------------------------------------------


def _without_model(spec: dict[str, Any]) -> None:
    spec["model"] = {}


def _two_sources(spec: dict[str, Any]) -> None:
    spec["model"] = {"path": "/models/a", "pvc": {"claimName": "models"}}


def _tensor_parallel(spec: dict[str, Any]) -> None:
    spec.setdefault("engine", {})["tensorParallelSize"] = 2


def _negative_replicas(spec: dict[str, Any]) -> None:
    spec.setdefault("engine", {})["replicas"] = -1


def _over_max_replicas(spec: dict[str, Any]) -> None:
    spec.setdefault("engine", {}).update(replicas=5, maxReplicas=4)


def _unknown_field(spec: dict[str, Any]) -> None:
    spec.setdefault("engine", {})["gpus"] = 1


INVALID: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    # case: (how to break the example, what the refusal must say)
    "no-model-source": (_without_model, ["exactly one of path, pvc or huggingFace"]),
    "two-model-sources": (_two_sources, ["exactly one of path, pvc or huggingFace"]),
    "tensor-parallel": (_tensor_parallel, ["tensor parallelism is not supported"]),
    "negative-replicas": (
        _negative_replicas,
        ["spec.engine.replicas", "greater than or equal to 0"],
    ),
    "unknown-field": (_unknown_field, ['unknown field "spec.engine.gpus"']),
    "over-max-replicas": (_over_max_replicas, ["must not exceed engine.maxReplicas"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_manifest_is_refused(stack: Stack, case: str) -> None:
    breaker, expected = INVALID[case]
    server = copy.deepcopy(_example())
    server["metadata"] = {"name": f"bad-{case}"}
    breaker(server["spec"])
    proc = stack.cluster.run("apply", "--namespace", NS, "-f", "-", check=False,
                             stdin=yaml.safe_dump(server))  # fmt: skip
    assert proc.returncode != 0, f"the API server accepted an invalid LLMServer ({case})"
    for text in expected:
        assert text in proc.stderr, f"{case}: {text!r} not in:\n{proc.stderr}"
    assert _get(stack, f"llmservers/bad-{case}") is None


# -- the chart's other shapes ----------------------------------------------------------------------

CHART_VALUES = {
    "defaults": [],
    "watched-namespaces": ["--set", f"operator.watchNamespaces={{default,{NS}}}"],
    "metrics-no-liveness": [
        "--set", "metrics.enabled=true", "--set", "operator.livenessProbe.enabled=false",
    ],
}  # fmt: skip


@pytest.mark.parametrize("values", sorted(CHART_VALUES))
def test_chart_template_is_accepted_by_the_api_server(stack: Stack, values: str) -> None:
    """`helm template` with other values than the installed ones, server-side dry run."""
    rendered = _helm(
        stack.cluster, stack.helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
        "--include-crds", *CHART_VALUES[values],
    )  # fmt: skip
    proc = stack.cluster.run("apply", "--dry-run=server", "-f", "-", stdin=rendered, check=False)
    assert proc.returncode == 0, f"{values}: the API server refused the chart:\n{proc.stderr}"
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= kinds, kinds
