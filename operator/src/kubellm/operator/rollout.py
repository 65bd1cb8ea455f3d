"""A spec change replaces every engine pod at once, not one by one.

A new spec is a new `--deployment-revision`: the head (a Recreate Deployment) comes back with it
and refuses engines of the old revision (design note 0003, EngineCompat). The StatefulSet's own
rolling update would replace engine pods one at a time, each waiting for the previous one to
load its model, while every old pod left is useless: capacity would come back one model load at
a time. So once the StatefulSet carries the new template, the operator deletes every engine pod
whose spec-hash label is older, and the StatefulSet controller (Parallel pod management,
partition 0) recreates them all at the new revision together. Scaling does not change the hash
(render.SCALE_FIELDS), so it deletes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kubernetes.dynamic.exceptions import ApiException

from kubellm.operator.config import LABEL_COMPONENT, LABEL_NAME
from kubellm.operator.render import SPEC_HASH_LABEL

JSON = Mapping[str, Any]
Log = logging.Logger | logging.LoggerAdapter[Any]


class _Resources(Protocol):
    def resource(self, api_version: str, kind: str) -> Any: ...


def stale_engine_pods(pods: Sequence[JSON], statefulset: str, spec_hash: str) -> list[JSON]:
    """Pods of `statefulset` that run another spec than `spec_hash` and are not already going."""
    stale = []
    for pod in pods:
        meta = pod.get("metadata", {})
        owners = [
            ref
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == "StatefulSet" and ref.get("name") == statefulset
        ]
        labels = meta.get("labels") or {}
        if (
            owners
            and not meta.get("deletionTimestamp")
            and labels.get(SPEC_HASH_LABEL) != spec_hash
        ):
            stale.append(pod)
    return sorted(stale, key=lambda p: str(p["metadata"]["name"]))


def replace_stale_engines(
    cluster: _Resources, namespace: str, name: str, spec_hash: str, log: Log
) -> list[str]:
    """Delete the engine pods of LLMServer `name` that run an older spec; their names. Each
    delete is conditional on the pod's uid, so a pod recreated meanwhile is left alone."""
    pods = cluster.resource("v1", "Pod")
    selector = f"{LABEL_NAME}={name},{LABEL_COMPONENT}=engine"
    listed = pods.get(namespace=namespace, label_selector=selector).to_dict()
    deleted = []
    for pod in stale_engine_pods(listed.get("items") or [], f"{name}-engine", spec_hash):
        meta = pod["metadata"]
        log.info(
            "write: delete pod %s/%s (spec %s, now %s)",
            namespace,
            meta["name"],
            (meta.get("labels") or {}).get(SPEC_HASH_LABEL),
            spec_hash,
        )
        try:
            pods.delete(
                name=meta["name"],
                namespace=namespace,
                body={"preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or replaced meanwhile
                raise
            continue
        deleted.append(str(meta["name"]))
    return deleted
