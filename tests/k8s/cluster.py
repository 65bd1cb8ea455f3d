"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok-controller, started by `kwokctl --runtime binary` from the binaries that
scripts/k8s-bins.sh builds from Go modules. No container runtime: kwok fakes the nodes and makes
pods Running/Ready; everything else (admission, CEL, RBAC, garbage collection, the Deployment and
StatefulSet controllers, scheduling against node capacity) is the real thing.

Usage in a conftest (any directory: e2e/ does the same):

    sys.path.insert(0, str(REPO / "tests" / "k8s"))
    from cluster import k8s_cluster, pytest_collection_finish  # noqa: F401

`k8s_cluster` (session scope) yields a `Cluster`: `kubeconfig`, `kubectl(*args)`, `bin_dir`,
`timings`. One cluster serves the whole session even when several conftests import the fixture;
it is deleted when the last user is done, also after failures, and processes that survive
`kwokctl delete cluster` are killed by pid. Stale clusters of crashed runs (`kubellm-test-<pid>`
whose pid is gone) are deleted first.

The binaries are built (or found) in `pytest_collection_finish`, before any test's timeout starts,
because a cold build takes tens of minutes; when it fails, the fixture fails with the build log.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "k8s-bins.sh"
KUBE_VERSION = "v1.36.4"
CLUSTER_PREFIX = "kubellm-test-"
GPU_RESOURCE = "nvidia.com/gpu"

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The test cluster could not be built, started or driven."""


@dataclass(frozen=True)
class FakeNode:
    """A kwok-managed Node with the capacity the scheduler sees."""

    name: str
    cpu: str = "16"
    memory: str = "128Gi"
    gpus: int = 2
    pods: int = 110


FAKE_NODES = (FakeNode("kwok-gpu-0"), FakeNode("kwok-gpu-1"))
"""What every test cluster starts with: 2 nodes, 32 CPUs, 256 GiB and 4 GPUs in all."""


# -- binaries -------------------------------------------------------------------------------------


@dataclass
class Build:
    bin_dir: Path | None = None
    seconds: float = 0.0
    error: str | None = None


_build: Build | None = None


def build_binaries() -> Build:
    """Run scripts/k8s-bins.sh once per process (it does nothing when all is built)."""
    global _build
    if _build is not None:
        return _build
    started = time.monotonic()
    lock_dir = Path.home() / ".cache" / "kubellm"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (
        open(lock_dir / "k8s-bins.lock", "w") as lock,
        tempfile.NamedTemporaryFile("w+", prefix="k8s-bins-", suffix=".log") as log,
    ):
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (test sessions, cluster.sh)
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, text=True, check=False
        )
        log.seek(0)
        text = log.read()
    seconds = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(text.splitlines()[-60:])
        _build = Build(seconds=seconds, error=f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{tail}")
    else:
        _build = Build(bin_dir=Path(lines[-1]), seconds=seconds)
    return _build


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries before the first test when any selected test is marked k8s.

    Several conftests may import this hook; the build and its line happen once.
    """
    if session.config.option.collectonly or _build is not None:
        return
    if any(item.get_closest_marker("k8s") for item in session.items):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"k8s binaries: {BUILD_SCRIPT.name} (a cold build takes ~20 min)")
        build = build_binaries()
        if reporter is not None:
            what = build.error.splitlines()[0] if build.error else str(build.bin_dir)
            reporter.write_line(f"k8s binaries: {what} ({build.seconds:.1f} s)")


# -- processes ------------------------------------------------------------------------------------


def kwok_workdir() -> Path:
    """kwokctl's work directory (KWOK_WORKDIR, default ~/.kwok), as kwokctl computes it."""
    return Path(os.environ.get("KWOK_WORKDIR") or Path.home() / ".kwok")


def tool_env(bin_dir: Path, kubeconfig: Path | None = None) -> dict[str, str]:
    """The environment for kwokctl/kubectl/helm: our binaries first; KUBECONFIG is ours when
    given (callers also pass --kubeconfig explicitly)."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["KWOK_KUBE_VERSION"] = KUBE_VERSION
    env["KWOK_KUBE_BINARY_PREFIX"] = str(bin_dir)
    env["KWOK_KUBECTL_BINARY"] = str(bin_dir / "kubectl")
    env["KWOK_ETCD_BINARY"] = str(bin_dir / "etcd")
    env["KWOK_CONTROLLER_BINARY"] = str(bin_dir / "kwok")
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def create_args(name: str, bin_dir: Path, kubeconfig: Path, wait: str = "5m") -> list[str]:
    """`kwokctl create cluster` with every binary taken from `bin_dir` (nothing downloaded).

    kwokctl v0.8.0 has no --kube-version flag: the version comes from KWOK_KUBE_VERSION (tool_env).
    """
    return [
        str(bin_dir / "kwokctl"),
        "create",
        "cluster",
        "--name",
        name,
        "--runtime",
        "binary",
        "--kube-apiserver-binary",
        str(bin_dir / "kube-apiserver"),
        "--kube-controller-manager-binary",
        str(bin_dir / "kube-controller-manager"),
        "--kube-scheduler-binary",
        str(bin_dir / "kube-scheduler"),
        "--kwok-controller-binary",
        str(bin_dir / "kwok"),
        "--etcd-binary",
        str(bin_dir / "etcd"),
        "--kubeconfig",
        str(kubeconfig),
        "--wait",
        wait,
    ]


def cluster_processes(name: str) -> list[psutil.Process]:
    """Live processes that belong to cluster `name`: their command line names its directory."""
    cluster_dir = str(kwok_workdir() / "clusters" / name)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if any(cluster_dir + os.sep in arg or arg == cluster_dir for arg in cmdline):
                found.append(proc)
    return found


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; only its exit status is left)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` for `procs` to exit, collecting the exit status of those that are our
    children (see `adopt_daemons`); returns those still running.

    A child counts as gone only once waitpid has reaped it: a Go program's main thread shows as a
    zombie while its other threads are still exiting, and cannot be reaped yet.
    """
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while True:
        still = []
        for proc in pending:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0] == 0:
                    still.append(proc)  # our child, not exited yet
            except ChildProcessError:  # not our child (or reaped already)
                if _running(proc):
                    still.append(proc)
        pending = still
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.1)


def kill_processes(procs: list[psutil.Process], timeout: float = 10.0) -> list[str]:
    """SIGTERM, then SIGKILL, each of `procs` (by pid); returns what had to be signalled."""
    killed = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.send_signal(signal.SIGTERM)
    for proc in _reap(procs, timeout):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _reap(procs, timeout)
    return killed


@contextlib.contextmanager
def adopt_daemons() -> Iterator[None]:
    """Become the child subreaper while kwokctl starts its daemons, so that etcd, apiserver...
    are re-parented to this process (not to pid 1, which may never reap them) and their exit
    statuses are collected by `_reap`: no zombies after the session. Linux only; a no-op elsewhere.
    """
    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        adopted = libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        adopted = False
    try:
        yield
    finally:
        if adopted:
            libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def delete_cluster(name: str, bin_dir: Path) -> list[str]:
    """`kwokctl delete cluster`, then kill what survived it; returns the survivors killed."""
    started = cluster_processes(name)
    with tempfile.TemporaryDirectory() as tmp:
        # --kubeconfig: kwokctl would otherwise edit ~/.kube/config, the user's.
        kubeconfig = Path(tmp) / "kubeconfig"
        proc = subprocess.run(
            [str(bin_dir / "kwokctl"), "delete", "cluster", "--name", name,
             "--kubeconfig", str(kubeconfig)],
            env=tool_env(bin_dir, kubeconfig),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        logger.warning("kwokctl delete cluster %s failed: %s", name, proc.stderr[-2000:])
    alive = _reap(started, timeout=15)
    pids = {p.pid for p in alive}
    survivors = kill_processes(alive + [p for p in cluster_processes(name) if p.pid not in pids])
    shutil.rmtree(kwok_workdir() / "clusters" / name, ignore_errors=True)
    return survivors


def _owner_alive(name: str, created: float) -> bool:
    """Whether the process that created `kubellm-test-<pid>` (at `created`) still runs.

    A pid reused by a later process does not count: the owner started before its cluster.
    """
    pid_text = name.removeprefix(CLUSTER_PREFIX)
    if not pid_text.isdigit():
        return True
    try:
        return psutil.Process(int(pid_text)).create_time() <= created
    except psutil.Error:
        return False


def delete_stale_clusters(bin_dir: Path) -> list[str]:
    """Delete `kubellm-test-<pid>` clusters whose creating process is gone (crashed runs)."""
    clusters = kwok_workdir() / "clusters"
    stale = [
        d.name
        for d in (sorted(clusters.iterdir()) if clusters.is_dir() else [])
        if d.name.startswith(CLUSTER_PREFIX) and not _owner_alive(d.name, d.stat().st_mtime)
    ]
    for name in stale:
        logger.warning("deleting stale test cluster %s", name)
        delete_cluster(name, bin_dir)
    return stale


@contextlib.contextmanager
def creation_lock() -> Iterator[None]:
    """Serialise cluster creation on this machine: kwokctl picks 'unused' ports before binding
    them, so two creations at once can race for the same port."""
    kwok_workdir().mkdir(parents=True, exist_ok=True)
    with open(kwok_workdir() / "kubellm-create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the cluster ----------------------------------------------------------------------------------


def node_manifest(node: FakeNode) -> dict[str, Any]:
    """A Node that kwok-controller manages (annotation `kwok.x-k8s.io/node: fake`).

    kwok keeps the capacity/allocatable given here and fills in conditions, addresses and
    heartbeats. No taint: there are no real nodes to keep pods away from.
    """
    resources = {
        "cpu": node.cpu,
        "memory": node.memory,
        "pods": str(node.pods),
        GPU_RESOURCE: str(node.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": node.name,
                "type": "kwok",
            },
        },
        "status": {"allocatable": resources, "capacity": resources},
    }


@dataclass
class Cluster:
    """A running kwokctl cluster and the tools to drive it."""

    name: str
    bin_dir: Path
    kubeconfig: Path
    workdir: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return tool_env(self.bin_dir, self.kubeconfig)

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl ARGS` against this cluster; raises ClusterError with stderr when `check`."""
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
            )
        return proc

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """`kubectl ARGS`, its stdout; raises ClusterError with stderr on failure."""
        return self.run(*args, stdin=stdin, timeout=timeout).stdout

    def get_json(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, *manifests: dict[str, Any], namespace: str | None = None) -> str:
        """`kubectl apply -f -` of `manifests` (dicts, dumped as YAML)."""
        ns = ["--namespace", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", stdin=yaml.safe_dump_all(manifests))

    def add_nodes(self, *nodes: FakeNode) -> None:
        """Create fake nodes and wait until kwok reports them Ready."""
        self.apply(*(node_manifest(n) for n in nodes))
        for n in nodes:
            self.kubectl("wait", "--for=condition=Ready", f"node/{n.name}", "--timeout=120s")

    def debug_dump(self, namespace: str | None = None) -> str:
        """Objects and events, for a loud failure message."""
        scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
        parts = []
        for what in (["get", "nodes", "-o", "wide"], ["get", "all,llms,pdb,netpol", *scope]):
            parts.append(self.run(*what, check=False).stdout)
        parts.append(
            self.run("get", "events", *scope, "--sort-by=.lastTimestamp", check=False).stdout
        )
        return "\n".join(parts)


def start_cluster(bin_dir: Path, workdir: Path, name: str | None = None) -> Cluster:
    """Create a cluster with the fake nodes; on any failure delete what was started."""
    name = name or f"{CLUSTER_PREFIX}{os.getpid()}"
    kubeconfig = workdir / "kubeconfig"
    cluster = Cluster(name=name, bin_dir=bin_dir, kubeconfig=kubeconfig, workdir=workdir)
    with creation_lock():
        delete_stale_clusters(bin_dir)
        if (kwok_workdir() / "clusters" / name).exists():
            delete_cluster(name, bin_dir)
        started = time.monotonic()
        try:
            with adopt_daemons():
                _create(cluster)
            cluster.timings["cluster_start_s"] = time.monotonic() - started
            cluster.add_nodes(*FAKE_NODES)
            cluster.timings["nodes_ready_s"] = time.monotonic() - started
        except BaseException:
            delete_cluster(name, bin_dir)
            raise
    return cluster


def _create(cluster: Cluster, attempts: int = 2) -> None:
    """kwokctl create cluster, retried once after a clean delete (a port taken meanwhile)."""
    log = cluster.workdir / "kwokctl-create.log"
    for attempt in range(1, attempts + 1):
        with open(log, "w") as out:
            proc = subprocess.run(
                create_args(cluster.name, cluster.bin_dir, cluster.kubeconfig),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=tool_env(cluster.bin_dir, cluster.kubeconfig),
                timeout=600,
                check=False,
            )
        if proc.returncode == 0:
            return
        text = log.read_text()
        logger.warning("kwokctl create cluster failed (attempt %d):\n%s", attempt, text[-3000:])
        delete_cluster(cluster.name, cluster.bin_dir)
    raise ClusterError(f"kwokctl create cluster {cluster.name} failed:\n{text[-4000:]}")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 120, interval: float = 0.5
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# -- the fixture ----------------------------------------------------------------------------------

_shared: Cluster | None = None
_users = 0


@contextlib.contextmanager
def shared_cluster(workdir: Path) -> Iterator[Cluster]:
    """One cluster per process however many fixtures ask for it; deleted by the last one."""
    global _shared, _users
    if _shared is None:
        build = _build_outside_test_timeout()
        if build.error or build.bin_dir is None:
            raise ClusterError(build.error or "scripts/k8s-bins.sh printed no directory")
        _shared = start_cluster(build.bin_dir, workdir)
        _shared.timings["build_s"] = build.seconds
        _timings_seen.update(_shared.timings)
        print(
            f"\nk8s cluster {_shared.name}: binaries {build.seconds:.1f} s, "
            f"cluster start {_shared.timings['cluster_start_s']:.1f} s, "
            f"nodes Ready {_shared.timings['nodes_ready_s']:.1f} s"
        )
    _users += 1
    cluster = _shared
    previous = _terminate_on_sigterm()
    try:
        yield cluster
    finally:
        _users -= 1
        if _users == 0:
            _shared = None
            survivors = delete_cluster(cluster.name, cluster.bin_dir)
            if survivors:
                logger.warning("killed processes that outlived the cluster: %s", survivors)
        signal.signal(signal.SIGTERM, previous)


def _build_outside_test_timeout() -> Build:
    """build_binaries() with pytest-timeout's SIGALRM paused: a cold build takes tens of minutes.

    Normally `pytest_collection_finish` has built already; this covers test modules that import
    the fixture without the hook.
    """
    remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        return build_binaries()
    finally:
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining)


def _terminate_on_sigterm() -> Any:
    """Make SIGTERM (CI cancelling the job) unwind through fixture teardown like Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, handler)
    return previous if previous is not None else signal.SIG_DFL


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real control plane (kwokctl, binary runtime) with FAKE_NODES, for the whole session."""
    with shared_cluster(tmp_path_factory.mktemp("k8s")) as cluster:
        yield cluster


_timings_seen: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the timings that the issue asks to report (once, however many conftests import it)."""
    if _timings_seen:
        terminalreporter.section("k8s timings")
        for key, value in sorted(_timings_seen.items()):
            terminalreporter.write_line(f"{key}: {value:.1f} s")
        _timings_seen.clear()


def record_timing(cluster: Cluster, key: str, seconds: float) -> None:
    """Keep a timing on the cluster and in the session summary."""
    cluster.timings[key] = seconds
    _timings_seen.update(cluster.timings)
    print(f"{key}: {seconds:.1f} s")


# -- for humans: scripts/cluster.sh ---------------------------------------------------------------

HUMAN_CLUSTER = "kubellm"


def main(argv: list[str]) -> int:
    """`python tests/k8s/cluster.py up|down|env`: the cluster `kubellm` for manual work."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = argv[0] if argv else ""
    if command not in ("up", "down", "env"):
        print("usage: cluster.py up|down|env", file=sys.stderr)
        return 2
    build = build_binaries()
    if build.error or build.bin_dir is None:
        print(build.error, file=sys.stderr)
        return 1
    workdir = Path.home() / ".cache" / "kubellm" / "clusters" / HUMAN_CLUSTER
    kubeconfig = workdir / "kubeconfig"
    running = (kwok_workdir() / "clusters" / HUMAN_CLUSTER).exists()
    if command == "down":
        if running:
            delete_cluster(HUMAN_CLUSTER, build.bin_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"cluster {HUMAN_CLUSTER} deleted", file=sys.stderr)
        return 0
    if command == "up" and not running:
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = start_cluster(build.bin_dir, workdir, name=HUMAN_CLUSTER)
        print(
            f"cluster {HUMAN_CLUSTER} started in {cluster.timings['cluster_start_s']:.1f} s "
            f"with nodes {', '.join(n.name for n in FAKE_NODES)}",
            file=sys.stderr,
        )
    elif not running:
        print(f"cluster {HUMAN_CLUSTER} is not running: scripts/cluster.sh up", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={kubeconfig}")
    print(f'export PATH="{build.bin_dir}:$PATH"')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
