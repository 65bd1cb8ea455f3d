"""A spec change deletes every old engine pod at once (`kubellm.operator.rollout`)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import ApiException

from kubellm.operator import rollout
from kubellm.operator.render import SPEC_HASH_LABEL

NS, NAME = "ns", "llm"
LOG = logging.getLogger("test")


def _pod(index: int, spec_hash: str, *, owner: str = f"{NAME}-engine", going: bool = False) -> Any:
    meta: dict[str, Any] = {
        "name": f"{owner}-{index}",
        "uid": f"uid-{owner}-{index}",
        "labels": {SPEC_HASH_LABEL: spec_hash},
        "ownerReferences": [{"kind": "StatefulSet", "name": owner, "controller": True}],
    }
    if going:
        meta["deletionTimestamp"] = "2026-11-21T00:00:00Z"
    return {"metadata": meta}


class _Listed:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items}


class _Pods:
    def __init__(self, items: list[Any], fail: dict[str, int] | None = None) -> None:
        self.items, self.fail = items, fail or {}
        self.selectors: list[str] = []
        self.deleted: list[tuple[str, Any]] = []

    def get(self, namespace: str, label_selector: str) -> _Listed:
        assert namespace == NS
        self.selectors.append(label_selector)
        return _Listed(self.items)

    def delete(self, name: str, namespace: str, body: Any) -> None:
        if name in self.fail:
            raise ApiException(status=self.fail[name])
        self.deleted.append((name, body))


class _Cluster:
    def __init__(self, pods: _Pods) -> None:
        self.pods = pods

    def resource(self, api_version: str, kind: str) -> _Pods:
        assert (api_version, kind) == ("v1", "Pod")
        return self.pods


def test_every_old_pod_is_deleted_in_one_pass_on_its_uid() -> None:
    pods = _Pods([_pod(0, "old"), _pod(1, "new"), _pod(2, "old"), _pod(3, "older")])
    deleted = rollout.replace_stale_engines(_Cluster(pods), NS, NAME, "new", LOG)
    assert deleted == [f"{NAME}-engine-0", f"{NAME}-engine-2", f"{NAME}-engine-3"]
    assert pods.deleted[0] == (
        f"{NAME}-engine-0",
        {"preconditions": {"uid": f"uid-{NAME}-engine-0"}},
    )
    assert pods.selectors == ["serving.kubellm.io/name=llm,serving.kubellm.io/component=engine"]


def test_current_terminating_and_foreign_pods_are_left_alone() -> None:
    pods = _Pods([_pod(0, "new"), _pod(1, "old", going=True), _pod(0, "old", owner="other")])
    assert rollout.replace_stale_engines(_Cluster(pods), NS, NAME, "new", LOG) == []
    assert pods.deleted == []


def test_a_pod_gone_or_replaced_meanwhile_is_not_an_error() -> None:
    pods = _Pods(
        [_pod(0, "old"), _pod(1, "old"), _pod(2, "old")],
        fail={f"{NAME}-engine-0": 404, f"{NAME}-engine-1": 409},
    )
    assert rollout.replace_stale_engines(_Cluster(pods), NS, NAME, "new", LOG) == [
        f"{NAME}-engine-2"
    ]


def test_other_api_errors_propagate() -> None:
    pods = _Pods([_pod(0, "old")], fail={f"{NAME}-engine-0": 403})
    with pytest.raises(ApiException):
        rollout.replace_stale_engines(_Cluster(pods), NS, NAME, "new", LOG)
