"""The drift rule (kubellm.operator.drift) on managedFields shaped like those a real
kube-apiserver 1.36 wrote for our children after kubectl scale / patch / edit / annotate /
rollout restart and kube-controller-manager's status updates; and the bounded conflict retry."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import ApiException

from kubellm.operator import apply, drift
from kubellm.operator.drift import Change

OP = "kubellm-operator"
CONTAINER = 'k:{"name":"kubellm"}'
LABELS = {"serving.kubellm.io/name": "a", "serving.kubellm.io/component": "engine"}


def manifest() -> dict[str, Any]:
    """A cut-down rendered StatefulSet: what the operator applies."""
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "a-engine",
            "namespace": "ns",
            "labels": dict(LABELS),
            "annotations": {"serving.kubellm.io/applied-hash": "abc"},
            "ownerReferences": [{"uid": "u-1", "kind": "LLMServer", "name": "a"}],
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(LABELS)},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "containers": [
                        {
                            "name": "kubellm",
                            "args": ["serve", "/models/tiny", "--headless"],
                            "env": [{"name": "HOME", "value": "/tmp"}],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def _keys(mapping: dict[str, Any]) -> dict[str, Any]:
    return {f"f:{k}": {} for k in mapping}


def ours() -> dict[str, Any]:
    """The fieldsV1 of the operator's Apply entry, as the API server records `manifest()`."""
    return {
        "f:metadata": {
            "f:annotations": {"f:serving.kubellm.io/applied-hash": {}},
            "f:labels": _keys(LABELS),
            "f:ownerReferences": {'k:{"uid":"u-1"}': {}},
        },
        "f:spec": {
            "f:replicas": {},
            "f:selector": {},  # atomic: owned whole
            "f:template": {
                "f:metadata": {"f:labels": _keys(LABELS)},
                "f:spec": {
                    "f:containers": {
                        CONTAINER: {
                            ".": {},
                            "f:name": {},
                            "f:args": {},
                            "f:env": {'k:{"name":"HOME"}': {".": {}, "f:name": {}, "f:value": {}}},
                            "f:ports": {
                                'k:{"containerPort":8000,"protocol":"TCP"}': {
                                    ".": {},
                                    "f:containerPort": {},
                                    "f:name": {},
                                }
                            },
                            "f:livenessProbe": {"f:httpGet": {"f:path": {}, "f:port": {}}},
                        }
                    },
                    "f:volumes": {'k:{"name":"tmp"}': {".": {}, "f:emptyDir": {}, "f:name": {}}},
                },
            },
        },
    }


def entry(
    manager: str, fields: dict[str, Any], op: str = "Update", sub: str = ""
) -> dict[str, Any]:
    out = {"manager": manager, "operation": op, "fieldsType": "FieldsV1", "fieldsV1": fields}
    if sub:
        out["subresource"] = sub
    return out


STATUS = entry(
    "kube-controller-manager",
    {
        "f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}},
        "f:status": {"f:replicas": {}, "f:readyReplicas": {}, "f:observedGeneration": {}},
    },
    sub="status",
)


def live(*entries: dict[str, Any], fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The live object: the manifest plus server defaults, with managedFields."""
    obj = manifest()
    obj["metadata"]["resourceVersion"] = "42"
    obj["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = "TCP"
    obj["metadata"]["managedFields"] = [
        entry(OP, ours() if fields is None else fields, op="Apply"),
        STATUS,
        *entries,
    ]
    return obj


def without(tree: dict[str, Any], *path: str) -> dict[str, Any]:
    """`tree` with the field at `path` dropped (another writer took it)."""
    out = copy.deepcopy(tree)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def find(obj: dict[str, Any]) -> list[Change]:
    return drift.find_drift(manifest(), obj, OP)


ARGS = ("f:spec", "f:template", "f:spec", "f:containers", CONTAINER, "f:args")


def test_a_freshly_applied_child_has_no_drift() -> None:
    assert find(live()) == []


def test_kubectl_scale_takes_replicas_through_the_scale_subresource() -> None:
    scaled = entry("kubectl", {"f:spec": {"f:replicas": {}}}, sub="scale")
    changes = find(live(scaled, fields=without(ours(), "f:spec", "f:replicas")))
    assert changes == [Change(("f:spec", "f:replicas"), "kubectl", added=False)]
    assert drift.describe("StatefulSet", "a-engine", changes) == (
        "statefulset a-engine spec.replicas was changed by kubectl"
    )
    assert drift.removal_patch(changes, live()) == []  # the forced apply restores it


def test_kubectl_patch_of_container_args_is_drift() -> None:
    patched = entry(
        "kubectl-patch",
        {"f:spec": {"f:template": {"f:spec": {"f:containers": {CONTAINER: {"f:args": {}}}}}}},
    )
    changes = find(live(patched, fields=without(ours(), *ARGS)))
    assert changes == [Change(ARGS, "kubectl-patch", added=False)]
    assert drift.field_name(ARGS) == "spec.template.spec.containers[name=kubellm].args"


def test_a_removed_field_is_owned_by_nobody() -> None:
    probe = (*ARGS[:-1], "f:livenessProbe", "f:httpGet", "f:path")
    changes = find(live(entry("kubectl-edit", {}), fields=without(ours(), *probe)))
    assert changes == [Change(probe, None, added=False)]
    assert "livenessProbe.httpGet.path was removed" in drift.describe("StatefulSet", "x", changes)


def test_other_managers_metadata_and_status_are_left_alone() -> None:
    annotated = entry("kubectl-annotate", {"f:metadata": {"f:annotations": {"f:user/note": {}}}})
    labelled = entry("kubectl-label", {"f:metadata": {"f:labels": {"f:team": {}}}})
    assert find(live(annotated, labelled)) == []


def test_the_same_value_applied_by_another_manager_is_shared_not_drift() -> None:
    other = entry("helm", {"f:spec": {"f:replicas": {}}}, op="Apply")
    assert find(live(other)) == []


def test_an_added_env_var_is_one_change_that_a_guarded_patch_removes() -> None:
    obj = live(
        entry(
            "kubectl-patch",
            {
                "f:spec": {
                    "f:template": {
                        "f:spec": {
                            "f:containers": {
                                CONTAINER: {
                                    "f:env": {
                                        'k:{"name":"FOO"}': {".": {}, "f:name": {}, "f:value": {}},
                                        'k:{"name":"BAR"}': {".": {}, "f:name": {}, "f:value": {}},
                                    }
                                }
                            }
                        }
                    }
                }
            },
        )
    )
    env = obj["spec"]["template"]["spec"]["containers"][0]["env"]
    env += [{"name": "FOO", "value": "1"}, {"name": "BAR", "value": "2"}]
    changes = find(obj)
    assert [(drift.field_name(c.path), c.manager, c.added) for c in changes] == [
        ("spec.template.spec.containers[name=kubellm].env[name=BAR]", "kubectl-patch", True),
        ("spec.template.spec.containers[name=kubellm].env[name=FOO]", "kubectl-patch", True),
    ]
    base = "/spec/template/spec/containers/0/env"
    assert drift.removal_patch(changes, obj) == [
        {"op": "test", "path": f"{base}/2", "value": {"name": "BAR", "value": "2"}},
        {"op": "test", "path": f"{base}/1", "value": {"name": "FOO", "value": "1"}},
        {"op": "remove", "path": f"{base}/2"},  # the higher index first
        {"op": "remove", "path": f"{base}/1"},
    ]


def test_a_pod_template_annotation_is_removed_but_rollout_restart_is_allowed() -> None:
    def annotated(manager: str, key: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"f:annotations": {".": {}, f"f:{key}": {}}}
        return entry(manager, {"f:spec": {"f:template": {"f:metadata": fields}}})

    obj = live(annotated("kubectl-patch", "x/y"))
    obj["spec"]["template"]["metadata"]["annotations"] = {"x/y": "z"}
    changes = find(obj)
    # the map itself ("." in its entry) stays: kubectl rollout restart may add to it too
    path = ("f:spec", "f:template", "f:metadata", "f:annotations", "f:x/y")
    assert changes == [Change(path, "kubectl-patch", added=True)]
    assert drift.removal_patch(changes, obj)[-1] == {
        "op": "remove",
        "path": "/spec/template/metadata/annotations/x~1y",
    }
    restart = annotated("kubectl-rollout", "kubectl.kubernetes.io/restartedAt")
    obj = live(restart)
    obj["spec"]["template"]["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "t"}
    assert find(obj) == []


def test_a_child_never_applied_by_the_operator_is_drift() -> None:
    obj = live()
    obj["metadata"]["managedFields"] = [entry("kubectl-create", ours())]
    changes = find(obj)
    assert changes == [Change((), None, added=False)]
    assert drift.describe("Service", "a", changes) == "service a was not applied by the operator"


def test_json_pointer_escapes_slashes_in_keys() -> None:
    obj = {"metadata": {"annotations": {"a/b~c": "1"}}}
    change = Change(("f:metadata", "f:annotations", "f:a/b~c"), "x", added=True)
    assert drift.removal_patch([change], obj)[-1]["path"] == "/metadata/annotations/a~1b~0c"


# -- bounded retries on conflicts (R25) ----------------------------------------------------------


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(apply.time, "sleep", slept.append)
    return slept


def _failing(statuses: list[int]) -> Any:
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if statuses:
            raise ApiException(status=statuses.pop(0), reason="test")
        return "done"

    return write, calls


def test_a_conflict_is_retried_with_backoff_and_converges(no_sleep: list[float]) -> None:
    write, calls = _failing([409, 409])
    log = apply.logger
    assert apply._retry_conflicts("x", log, write) == "done"
    assert len(calls) == 3 and no_sleep == list(apply._CONFLICT_BACKOFF_S[:2])


def test_conflicts_are_retried_a_bounded_number_of_times(no_sleep: list[float]) -> None:
    write, calls = _failing([409] * 100)
    with pytest.raises(ApiException):
        apply._retry_conflicts("x", apply.logger, write)
    assert len(calls) == len(apply._CONFLICT_BACKOFF_S) + 1


def test_other_errors_are_not_retried(no_sleep: list[float]) -> None:
    write, calls = _failing([422])
    with pytest.raises(ApiException):
        apply._retry_conflicts("x", apply.logger, write)
    assert len(calls) == 1 and no_sleep == []


def test_the_event_fingerprint_ignores_status_and_timestamps_only() -> None:
    obj = live()
    before = apply._fingerprint(obj)
    obj["metadata"]["managedFields"][1] = entry(
        "kube-controller-manager", {"f:status": {"f:availableReplicas": {}}}, sub="status"
    )
    obj["metadata"]["managedFields"][0]["time"] = "2026-11-21T14:00:00Z"
    obj["status"] = {"readyReplicas": 1}
    assert apply._fingerprint(obj) == before
    obj["metadata"]["managedFields"].append(
        entry("kubectl", {"f:spec": {"f:replicas": {}}}, sub="scale")
    )
    assert apply._fingerprint(obj) != before
