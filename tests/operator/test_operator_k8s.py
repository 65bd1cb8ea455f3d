"""The operator (`kubellm-operator run`, a subprocess) against the real control plane.

kube-apiserver, kube-controller-manager (garbage collection, Deployment and StatefulSet
controllers) and kube-scheduler are real; kwok fakes the nodes (2 of them, 2 nvidia.com/gpu
each) and makes scheduled pods Running and Ready. One operator serves one namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from cluster import Cluster, k8s_cluster, wait_for  # type: ignore[import-not-found, unused-ignore]

__all__ = ["k8s_cluster"]

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

NS = "kubellm-operator-test"
OPERATOR = Path(sys.executable).parent / "kubellm-operator"
CRD = "llmservers.serving.kubellm.io"
LABEL = "serving.kubellm.io/name"
CHILD_KINDS = "deployments,statefulsets,services,poddisruptionbudgets,networkpolicies"
T = TypeVar("T")


class Operator:
    """One `kubellm-operator run` process with its log in a file."""

    def __init__(self, cluster: Cluster, log_dir: Path) -> None:
        self.cluster, self.log_dir = cluster, log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "operator-0.log"
        self.starts = 0

    def start(self) -> None:
        self.log_path = self.log_dir / f"operator-{self.starts}.log"
        self.starts += 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("KUBECONFIG", None)
        cmd = [
            str(OPERATOR),
            "run",
            "--namespace",
            NS,
            "--kubeconfig",
            str(self.cluster.kubeconfig),
        ]
        cmd += ["--default-image", "registry.test/kubellm:e2e"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM; the exit code (kills and fails the test if it does not exit in time)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"operator ignored SIGTERM for {timeout} s\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: an operator that dies mid-reconcile."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def operator(k8s_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    cluster = k8s_cluster
    created_crd = cluster.run("get", "crd", CRD, check=False).returncode != 0
    if created_crd:
        crd_yaml = subprocess.run(
            [str(OPERATOR), "crd"], capture_output=True, text=True, check=True
        ).stdout
        cluster.kubectl("create", "-f", "-", stdin=crd_yaml)
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s")
    cluster.kubectl("create", "namespace", NS)
    op = Operator(cluster, tmp_path_factory.mktemp("operator"))
    op.start()
    try:
        yield op
    finally:
        rc = op.stop()
        cluster.run("delete", "namespace", NS, "--wait=false", check=False)
        if created_crd:
            cluster.run("delete", "crd", CRD, "--wait=false", check=False)
        assert rc == 0, f"operator exited {rc} on SIGTERM\n{op.log()[-4000:]}"


def eventually(op: Operator, what: str, probe: Callable[[], T | None], timeout: float = 180) -> T:
    """wait_for, failing loudly with the operator's log and the namespace's objects and events."""

    def alive_probe() -> T | None:
        if op.proc is not None and op.proc.poll() is not None:
            raise AssertionError(f"operator exited {op.proc.returncode}\n{op.log()[-6000:]}")
        return probe()

    try:
        return wait_for(what, alive_probe, timeout=timeout, interval=1.0)
    except TimeoutError as exc:
        dump = op.cluster.debug_dump(NS)
        raise AssertionError(f"{exc}\n--- operator log ---\n{op.log()[-6000:]}\n{dump}") from None


def llmserver(name: str, engines: int = 2, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"path": "/models/tiny"},
        "engine": {"replicas": engines, "gpusPerPod": 1},
        "startupTimeoutSeconds": 60,
        **extra,
    }
    return {
        "apiVersion": "serving.kubellm.io/v1alpha1",
        "kind": "LLMServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def get(cluster: Cluster, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get_json("llms", name, "-n", NS)
    return result


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == ctype:
            return dict(cond)
    return {}


def children(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    found = cluster.get_json(CHILD_KINDS, "-n", NS, "-l", f"{LABEL}={name}")
    return list(found["items"])


def ready(cluster: Cluster, name: str) -> dict[str, Any] | None:
    obj = get(cluster, name)
    return obj if condition(obj, "Ready").get("status") == "True" else None


def test_reconciles_children_to_ready(operator: Operator) -> None:
    cluster = operator.cluster
    cluster.apply(llmserver("alpha"))
    obj = eventually(operator, "LLMServer alpha Ready", lambda: ready(cluster, "alpha"))
    assert obj["status"]["engine"] == {"ready": 2, "desired": 2}
    assert obj["status"]["head"] == {"ready": 1, "desired": 1}
    assert obj["status"]["url"] == f"http://alpha.{NS}.svc:8000/v1"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert not obj["metadata"].get("finalizers"), "no finalizers (R26)"
    kinds = sorted((c["kind"], c["metadata"]["name"]) for c in children(cluster, "alpha"))
    assert ("Deployment", "alpha-head") in kinds and ("StatefulSet", "alpha-engine") in kinds
    assert ("Service", "alpha") in kinds and ("NetworkPolicy", "alpha-engine-links") in kinds
    assert sum(k == "PodDisruptionBudget" for k, _ in kinds) == 2
    uid = obj["metadata"]["uid"]
    for child in children(cluster, "alpha"):
        refs = child["metadata"].get("ownerReferences", [])
        assert [(r["uid"], r.get("controller")) for r in refs] == [(uid, True)], child["kind"]
    reasons = eventually(operator, "Created and Ready events", lambda: _events(cluster, "alpha"))
    assert {"Created", "Ready"} <= reasons


def _events(cluster: Cluster, name: str) -> set[str] | None:
    found = cluster.get_json("events", "-n", NS, "--field-selector", f"involvedObject.name={name}")
    reasons = {e["reason"] for e in found["items"]}
    return reasons if {"Created", "Ready"} <= reasons else None


def test_restart_reconciles_without_writes(operator: Operator) -> None:
    """R24: an operator restart resumes every LLMServer; nothing changed, so nothing is written."""
    cluster = operator.cluster
    eventually(operator, "LLMServer alpha Ready", lambda: ready(cluster, "alpha"))
    before = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
        for c in children(cluster, "alpha")
    }
    status_before = get(cluster, "alpha")["status"]
    assert operator.stop() == 0, "SIGTERM must stop the operator cleanly"
    operator.start()
    eventually(
        operator,
        "the restarted operator to resume alpha",
        lambda: "Handler 'reconcile' succeeded" in operator.log() or None,
        timeout=120,
    )
    time.sleep(3)  # let any pod/child events that the resume triggers be handled too
    writes = [line for line in operator.log().splitlines() if "write:" in line]
    assert writes == [], "\n".join(writes)
    after = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
        for c in children(cluster, "alpha")
    }
    assert after == before, "children were written (or duplicated) by a no-op reconcile"
    assert get(cluster, "alpha")["status"] == status_before


def test_scale_beyond_gpus_is_unschedulable_then_recovers(operator: Operator) -> None:
    cluster = operator.cluster
    eventually(operator, "LLMServer alpha Ready", lambda: ready(cluster, "alpha"))
    cluster.kubectl("scale", "-n", NS, "llms/alpha", "--replicas=5")  # 4 GPUs in the cluster

    def unschedulable() -> dict[str, Any] | None:
        degraded = condition(get(cluster, "alpha"), "Degraded")
        return degraded if degraded.get("reason") == "Unschedulable" else None

    degraded = eventually(operator, "Degraded=Unschedulable", unschedulable)
    assert degraded["status"] == "True"
    assert "Insufficient nvidia.com/gpu" in degraded["message"], degraded
    assert condition(get(cluster, "alpha"), "Ready")["status"] == "False"
    sts = cluster.get_json("statefulset", "alpha-engine", "-n", NS)
    assert sts["spec"]["replicas"] == 5
    cluster.kubectl("scale", "-n", NS, "llms/alpha", "--replicas=3")

    def recovered() -> dict[str, Any] | None:
        obj = ready(cluster, "alpha")
        if obj is None or condition(obj, "Degraded")["status"] != "False":
            return None
        done = condition(obj, "Progressing")["reason"] == "Complete"
        return obj if done and obj["status"]["engine"]["ready"] == 3 else None

    obj = eventually(operator, "Ready, not Degraded, rollout Complete with 3 engines", recovered)
    assert obj["status"]["engine"]["desired"] == 3


def test_missing_secret_is_a_condition_then_recovers(operator: Operator) -> None:
    """R25: what only the operator can detect becomes a condition, not an endless retry."""
    cluster = operator.cluster
    ref = {"name": "beta-keys", "key": "api-key"}
    cluster.apply(llmserver("beta", engines=1, apiKeySecretRef=ref))

    def missing_secret() -> dict[str, Any] | None:
        cond = condition(get(cluster, "beta"), "Ready")
        return cond if cond.get("reason") == "MissingSecret" else None

    cond = eventually(operator, "Ready=False MissingSecret", missing_secret, timeout=120)
    assert cond["status"] == "False" and "beta-keys" in cond["message"]
    assert children(cluster, "beta") == []
    time.sleep(5)  # kopf would have retried by now if the error were not permanent
    attempts = operator.log().count("write: status of " + f"{NS}/beta")
    assert attempts == 1, operator.log()[-4000:]
    cluster.kubectl(
        "create", "secret", "generic", "beta-keys", "-n", NS, "--from-literal=api-key=sk-test"
    )
    cluster.kubectl("annotate", "-n", NS, "llms/beta", "retry=1")
    eventually(operator, "LLMServer beta Ready", lambda: ready(cluster, "beta"))
    deployment = cluster.get_json("deployment", "beta-head", "-n", NS)
    env = json.dumps(deployment["spec"]["template"]["spec"]["containers"])
    assert "beta-keys" in env


def test_killed_mid_create_converges_to_one_child_set(operator: Operator) -> None:
    """R24: an operator killed while creating children leaves no duplicates after a restart."""
    cluster = operator.cluster
    assert operator.stop() == 0
    # CPU engine: alpha and beta hold all 4 fake GPUs
    cluster.apply(llmserver("gamma", engine={"replicas": 1, "gpusPerPod": 0}))
    operator.start()
    eventually(
        operator,
        "the operator to start writing gamma's children",
        lambda: f"write: apply {NS}/" in operator.log() or None,
        timeout=120,
    )
    operator.kill()
    operator.start()
    # The restarted operator must itself reconcile gamma (its resume handler), not only find
    # the children its predecessor wrote; this also makes sure it is fully up before teardown.
    eventually(
        operator,
        "the restarted operator to reconcile gamma",
        lambda: f"[{NS}/gamma] Handler 'reconcile' succeeded" in operator.log() or None,
        timeout=120,
    )
    obj = eventually(operator, "LLMServer gamma Ready", lambda: ready(cluster, "gamma"))
    found = sorted((c["kind"], c["metadata"]["name"]) for c in children(cluster, "gamma"))
    assert found == [
        ("Deployment", "gamma-head"),
        ("NetworkPolicy", "gamma-engine-links"),
        ("PodDisruptionBudget", "gamma-engine"),
        ("PodDisruptionBudget", "gamma-head"),
        ("Service", "gamma"),
        ("Service", "gamma-engine"),
        ("Service", "gamma-head-rpc"),
        ("StatefulSet", "gamma-engine"),
    ]
    pods = cluster.get_json("pods", "-n", NS, "-l", f"{LABEL}=gamma")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # one head, one engine
    assert obj["status"]["engine"] == {"ready": 1, "desired": 1}


# -- drift (R25): other writers' changes to the children are undone ------------------------------

DRIFT_BOUND_S = 30
"""Generous upper bound on detecting and undoing a change (it takes well under a second)."""


def _drift_events(cluster: Cluster, name: str) -> list[str]:
    found = cluster.get_json(
        "events", "-n", NS, "--field-selector", f"involvedObject.name={name},reason=Drift"
    )
    return [e["message"] for e in found["items"]]


def _writes(op: Operator, since: int) -> list[str]:
    return [line for line in op.log().splitlines()[since:] if "write:" in line]


def _log_lines(op: Operator) -> int:
    return len(op.log().splitlines())


def _drift_event(cluster: Cluster, name: str, *parts: str) -> str | None:
    for message in _drift_events(cluster, name):
        if all(p in message for p in parts):
            return message
    return None


def test_drift_scale_of_the_engines_is_undone(operator: Operator) -> None:
    cluster = operator.cluster
    cluster.apply(llmserver("delta", engine={"replicas": 2, "gpusPerPod": 0}))
    eventually(operator, "LLMServer delta Ready", lambda: ready(cluster, "delta"))
    cluster.kubectl("scale", "-n", NS, "statefulset/delta-engine", "--replicas=4")

    def restored() -> bool:
        sts = cluster.get_json("statefulset", "delta-engine", "-n", NS)
        return sts["spec"]["replicas"] == 2 and sts["metadata"]["generation"] > 1

    eventually(operator, "engine replicas back at 2", restored, timeout=DRIFT_BOUND_S)
    message = eventually(
        operator,
        "a Drift event",
        lambda: _drift_event(cluster, "delta", "statefulset delta-engine", "spec.replicas"),
        timeout=DRIFT_BOUND_S,
    )
    assert message.endswith("was changed by kubectl; restored"), message


def test_drift_patched_head_args_are_restored(operator: Operator) -> None:
    cluster = operator.cluster
    eventually(operator, "LLMServer delta Ready", lambda: ready(cluster, "delta"))
    path = "/spec/template/spec/containers/0/args"

    def args() -> list[str]:
        deployment = cluster.get_json("deployment", "delta-head", "-n", NS)
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    declared = args()
    patch = json.dumps([{"op": "replace", "path": path, "value": ["serve", "/elsewhere"]}])
    cluster.kubectl("patch", "-n", NS, "deployment/delta-head", "--type=json", "-p", patch)
    eventually(operator, "head args restored", lambda: args() == declared, timeout=DRIFT_BOUND_S)
    eventually(
        operator,
        "a Drift event naming the args and kubectl-patch",
        lambda: _drift_event(cluster, "delta", "deployment delta-head", ".args", "kubectl-patch"),
        timeout=DRIFT_BOUND_S,
    )


def test_drift_another_managers_metadata_annotation_is_left_alone(operator: Operator) -> None:
    cluster = operator.cluster
    eventually(operator, "LLMServer delta Ready", lambda: ready(cluster, "delta"))
    since = _log_lines(operator)
    cluster.kubectl("annotate", "-n", NS, "deployment/delta-head", "team.example/owner=ml")
    eventually(
        operator,
        "the operator to see the annotated Deployment",
        lambda: any(
            f"[{NS}/delta-head] Handler 'child_changed'" in line
            for line in operator.log().splitlines()[since:]
        ),
    )
    time.sleep(3)  # a restore would have happened within this time (see the tests above)
    deployment = cluster.get_json("deployment", "delta-head", "-n", NS)
    assert deployment["metadata"]["annotations"]["team.example/owner"] == "ml"
    applies = [w for w in _writes(operator, since) if "write: status" not in w]
    assert applies == [], "\n".join(applies)


def test_drift_deleted_child_is_recreated(operator: Operator) -> None:
    cluster = operator.cluster
    cluster.kubectl("delete", "-n", NS, "service/delta-head-rpc", "--wait=true")
    eventually(
        operator,
        "Service delta-head-rpc recreated",
        lambda: cluster.run("get", "-n", NS, "service/delta-head-rpc", check=False).returncode == 0,
        timeout=DRIFT_BOUND_S,
    )
    eventually(
        operator,
        "a Drift event for the deletion",
        lambda: _drift_event(cluster, "delta", "service delta-head-rpc was deleted; recreated"),
        timeout=DRIFT_BOUND_S,
    )


def test_drift_a_writer_racing_the_operator_converges(operator: Operator) -> None:
    """R25: another manager keeps scaling the engines and overwriting the LLMServer's status
    while the operator restores and recomputes (its status patches carry a resourceVersion,
    so they meet 409s); once the writer stops, everything converges."""
    cluster = operator.cluster
    eventually(operator, "LLMServer delta Ready", lambda: ready(cluster, "delta"))
    fake_status = json.dumps({"status": {"engine": {"ready": 0, "desired": 9}}})
    deadline = time.monotonic() + 6
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        cluster.kubectl(
            "patch", "-n", NS, "llms/delta", "--subresource=status", "--type=merge",
            "-p", fake_status,
        )  # fmt: skip
        cluster.kubectl(
            "scale", "-n", NS, "statefulset/delta-engine", f"--replicas={3 + rounds % 2}"
        )
    print(f"{rounds} rounds; conflicts retried: {operator.log().count('changed meanwhile')}")

    def converged() -> dict[str, Any] | None:
        sts = cluster.get_json("statefulset", "delta-engine", "-n", NS)
        obj = ready(cluster, "delta")
        if sts["spec"]["replicas"] != 2 or obj is None:
            return None
        return obj if obj["status"]["engine"] == {"ready": 2, "desired": 2} else None

    eventually(operator, "replicas 2 and a true status again", converged, timeout=60)


def test_drift_quiet_after_convergence_means_no_writes(operator: Operator) -> None:
    """After the restores above, the other managers own nothing the operator applies: no loop."""
    cluster = operator.cluster

    def settled() -> dict[str, Any] | None:
        obj = ready(cluster, "delta")
        done = obj is not None and condition(obj, "Progressing").get("reason") == "Complete"
        pods = cluster.get_json("pods", "-n", NS, "-l", f"{LABEL}=delta")["items"]
        return obj if done and len(pods) == 3 else None  # one head, two engines, none leaving

    eventually(operator, "delta Ready, rollout complete, no pod terminating", settled)
    time.sleep(3)
    since = _log_lines(operator)
    before = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
        for c in children(cluster, "delta")
    }
    time.sleep(8)
    writes = _writes(operator, since)
    assert writes == [], "\n".join(writes)
    after = {
        (c["kind"], c["metadata"]["name"]): c["metadata"]["resourceVersion"]
        for c in children(cluster, "delta")
    }
    assert after == before


def test_delete_garbage_collects_children(operator: Operator) -> None:
    cluster = operator.cluster
    for name in ("alpha", "beta", "gamma", "delta"):
        cluster.kubectl("delete", "-n", NS, f"llms/{name}", "--ignore-not-found", "--timeout=60s")
    eventually(
        operator,
        "children garbage-collected",
        lambda: not any(children(cluster, n) for n in ("alpha", "beta", "gamma", "delta")),
        timeout=180,
    )


def test_no_handler_raised(operator: Operator) -> None:
    """Across every operator run of this module, no handler failed with an exception."""
    for log in sorted(operator.log_dir.glob("operator-*.log")):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "failed with an exception" not in text, (
            f"{log.name}:\n{text[-6000:]}"
        )
