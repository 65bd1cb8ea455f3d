"""kopf registrations, and nothing else: each handler hands over to `kubellm.operator.apply`.

Handlers live in their own `registry` (not kopf's global one) that `cli.py` passes to kopf.
kopf's memo carries `config` (OperatorConfig, set by the CLI) and `cluster` (apply.Cluster,
connected at start-up).

- LLMServer created / changed / found at start-up → render, apply, status (`apply.reconcile`).
- A child (Deployment, StatefulSet, Service, PodDisruptionBudget, NetworkPolicy) labelled
  serving.kubellm.io/name changes or is deleted → undo drift, if another writer changed what the
  operator applied (`apply.check_child`), then refresh the status. A Pod → status only.
  The watches select on that label server-side, so other objects never reach the operator.

No finalizers (R26): there are no deletion handlers, timers or daemons; deleting an LLMServer
deletes its children through their ownerReferences (garbage collection), also while the
operator is down. kopf's own bookkeeping lives in annotations with our prefix, not in status.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubellm.operator import apply, metrics, spec
from kubellm.operator.apply import Log
from kubellm.operator.config import KOPF_PREFIX, LABEL_NAME

registry = kopf.OperatorRegistry()

RETRY_S = 10
"""Seconds before kopf retries a reconcile that failed on a transient error (API down, ...)."""

CHILD_RESOURCES = (
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("", "v1", "pods"),
)
"""What the operator watches (label-selected): every child kind it applies, and the pods."""


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: annotation storage, server-side label selectors, explicit Events only."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    for group, version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[group, version, plural] = LABEL_NAME
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    settings.networking.error_backoffs = [1, 2, 5, 10]


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials from the kubernetes client: in-cluster, else $KUBECONFIG (set by the CLI)."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings)
    memo.cluster = apply.Cluster.connect(memo.config.kubeconfig)


@kopf.on.resume(spec.GROUP, spec.VERSION, spec.PLURAL, registry=registry, backoff=RETRY_S)
@kopf.on.create(spec.GROUP, spec.VERSION, spec.PLURAL, registry=registry, backoff=RETRY_S)
@kopf.on.update(spec.GROUP, spec.VERSION, spec.PLURAL, registry=registry, backoff=RETRY_S)
def reconcile(body: kopf.Body, memo: Any, logger: Log, **_: Any) -> None:
    with metrics.reconciling(lambda e: isinstance(e, kopf.PermanentError)):
        apply.reconcile(memo.cluster, memo.config, body, logger)


_LABELLED = {LABEL_NAME: kopf.PRESENT}
STATUS_KINDS = ("Deployment", "StatefulSet")
"""Children whose changes can change the LLMServer's status (with the pods)."""


@kopf.on.event("apps", "v1", "deployments", labels=_LABELLED, registry=registry)
@kopf.on.event("apps", "v1", "statefulsets", labels=_LABELLED, registry=registry)
@kopf.on.event("", "v1", "services", labels=_LABELLED, registry=registry)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_LABELLED, registry=registry)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=_LABELLED, registry=registry)
def child_changed(
    body: kopf.Body,
    namespace: str | None,
    type: str | None,  # noqa: A002 (kopf's keyword: ADDED / MODIFIED / DELETED / None)
    memo: Any,
    logger: Log,
    **_: Any,
) -> None:
    apply.check_child(memo.cluster, memo.config, body, type, logger)
    if body.get("kind") in STATUS_KINDS:
        _refresh(body, namespace, memo, logger)


@kopf.on.event("", "v1", "pods", labels=_LABELLED, registry=registry)
def pod_changed(body: kopf.Body, namespace: str | None, memo: Any, logger: Log, **_: Any) -> None:
    _refresh(body, namespace, memo, logger)


def _refresh(body: kopf.Body, namespace: str | None, memo: Any, logger: Log) -> None:
    owner = body.metadata.labels.get(LABEL_NAME)
    if owner and namespace:
        metrics.STATUS_REFRESHES.inc()
        apply.refresh_status(memo.cluster, namespace, owner, logger)
