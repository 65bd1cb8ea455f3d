"""The test cluster itself: fake GPU nodes, kwok-run pods, the real scheduler and GC, teardown."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import cluster  # type: ignore[import-not-found, unused-ignore]
import psutil
import pytest
from cluster import (  # type: ignore[import-not-found, unused-ignore]
    CLUSTER_PREFIX,
    FAKE_NODES,
    GPU_RESOURCE,
    Cluster,
    _owner_alive,
    cluster_processes,
    create_args,
    delete_cluster,
    node_manifest,
    start_cluster,
    wait_for,
)


def test_node_manifest_is_managed_by_kwok_and_advertises_gpus() -> None:
    node = node_manifest(FAKE_NODES[0])
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["allocatable"] == node["status"]["capacity"]
    assert node["status"]["allocatable"][GPU_RESOURCE] == str(FAKE_NODES[0].gpus)


def test_create_args_download_nothing(tmp_path: Path) -> None:
    args = create_args("x", tmp_path, tmp_path / "kubeconfig")
    for flag in ("--kube-apiserver-binary", "--etcd-binary", "--kwok-controller-binary"):
        assert args[args.index(flag) + 1].startswith(str(tmp_path))
    assert not any(a.startswith("http") for a in args)


def test_stale_cluster_detection() -> None:
    mine = f"{CLUSTER_PREFIX}{os.getpid()}"
    assert _owner_alive(mine, time.time())
    started = psutil.Process().create_time()
    assert not _owner_alive(mine, started - 60), "a reused pid must not keep a cluster alive"
    assert not _owner_alive(f"{CLUSTER_PREFIX}999999999", time.time())
    assert _owner_alive("someone-elses-cluster", 0.0)


def test_failed_build_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "k8s-bins.sh"
    script.write_text("echo 'go: module lookup disabled' >&2\nexit 3\n")
    monkeypatch.setattr(cluster, "BUILD_SCRIPT", script)
    monkeypatch.setattr(cluster, "_build", None)
    build = cluster.build_binaries()
    assert build.bin_dir is None
    assert build.error is not None
    assert "failed (3)" in build.error and "go: module lookup disabled" in build.error
    failing = pytest.raises(cluster.ClusterError, match="module lookup disabled")
    with failing, cluster.shared_cluster(tmp_path):
        pass


def _namespace(cluster: Cluster, name: str) -> str:
    cluster.run("delete", "namespace", name, "--ignore-not-found", "--wait=true")
    cluster.kubectl("create", "namespace", name)
    return name


def _deployment(name: str, replicas: int, gpus: int) -> dict[str, Any]:
    labels = {"app": name}
    container = {
        "name": "main",
        "image": "example.invalid/none:0",
        "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.slow
def test_fake_nodes_are_ready_with_gpus(k8s_cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in k8s_cluster.get_json("nodes")["items"]}
    for fake in FAKE_NODES:
        status = nodes[fake.name]["status"]
        assert status["allocatable"][GPU_RESOURCE] == str(fake.gpus)
        ready = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.slow
def test_gpu_pods_run_and_children_are_garbage_collected(k8s_cluster: Cluster) -> None:
    ns = _namespace(k8s_cluster, "cluster-smoke")
    k8s_cluster.apply(_deployment("gpu", replicas=2, gpus=1), namespace=ns)
    k8s_cluster.kubectl("rollout", "status", "deployment/gpu", "-n", ns, "--timeout=120s")
    uid = k8s_cluster.get_json("deployment/gpu", "-n", ns)["metadata"]["uid"]
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpu", "uid": uid}
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "child", "ownerReferences": [owner]},
    }
    k8s_cluster.apply(child, namespace=ns)
    k8s_cluster.kubectl("delete", "deployment/gpu", "-n", ns, "--wait=false")
    wait_for(
        "GC of the owned ConfigMap and the pods",
        lambda: (
            not k8s_cluster.kubectl(
                "get", "configmap/child,pods", "-n", ns, "-o", "name", "--ignore-not-found"
            ).strip()
        ),
        timeout=120,
    )


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.slow
def test_scheduler_reports_insufficient_gpus(k8s_cluster: Cluster) -> None:
    ns = _namespace(k8s_cluster, "cluster-nogpu")
    too_many = max(n.gpus for n in FAKE_NODES) + 1
    k8s_cluster.apply(_deployment("big", replicas=1, gpus=too_many), namespace=ns)

    def unschedulable() -> str | None:
        for pod in k8s_cluster.get_json("pods", "-n", ns)["items"]:
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    return str(cond.get("message", ""))
        return None

    message = wait_for("the pod to be reported unschedulable", unschedulable, timeout=120)
    assert f"Insufficient {GPU_RESOURCE}" in message
    k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.mark.k8s
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_delete_cluster_leaves_no_process(k8s_cluster: Cluster, tmp_path: Path) -> None:
    """A second, short-lived cluster: its etcd/apiserver/... are gone after delete_cluster."""
    second = start_cluster(k8s_cluster.bin_dir, tmp_path, name=f"{k8s_cluster.name}-b")
    try:
        procs = cluster_processes(second.name)
        running = {" ".join(p.cmdline()) for p in procs}
        assert any("kube-apiserver" in c for c in running), running
        assert any("etcd" in c for c in running), running
    finally:
        survivors = delete_cluster(second.name, second.bin_dir)
    assert survivors == [], f"kwokctl delete cluster left these running: {survivors}"
    assert cluster_processes(second.name) == []
    zombies = [p.pid for p in procs if psutil.pid_exists(p.pid)]
    assert zombies == [], "exited cluster processes must be reaped (adopt_daemons)"
