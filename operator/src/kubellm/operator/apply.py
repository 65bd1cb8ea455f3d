"""The only module that talks to the Kubernetes API.

`reconcile` renders an LLMServer's children, applies what changed (server-side apply, field
manager `kubellm-operator`, forced), deletes the children it no longer renders, and writes the
status; `refresh_status` only recomputes the status (on child and pod events). Each write is
logged once at INFO as "write: ..." so that tests and humans can see there were none (R24).

A child is skipped when its live `serving.kubellm.io/applied-hash` annotation equals the hash of
the manifest about to be applied: an unchanged LLMServer costs reads only.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
import pydantic
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException, NotFoundError, ResourceNotFoundError

from kubellm.operator import render, spec, status
from kubellm.operator.config import (
    ANNOTATION_APPLIED,
    FIELD_MANAGER,
    LABEL_COMPONENT,
    LABEL_NAME,
    OperatorConfig,
)

logger = logging.getLogger(__name__)

JSON = Mapping[str, Any]
Log = logging.Logger | logging.LoggerAdapter[Any]

MANAGED_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
)
"""Every kind `render` may produce: what is listed when looking for children to delete."""

SPEC_PROBLEMS = ("InvalidSpec", "MissingSecret", "MissingVolume", "NameConflict")
"""Condition reasons of problems in the spec itself; they hold until the spec changes."""

_STATUS_RETRIES = 5
_ABSENT_TTL_S = 300.0


class SpecError(Exception):
    """The LLMServer cannot be reconciled until its spec (or a Secret/PVC it names) changes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass
class Cluster:
    """A connected API client; built once at operator start-up and kept in kopf's memo."""

    api: k8s.ApiClient
    dynamic: DynamicClient
    _locks: dict[tuple[str, str], threading.Lock] = dataclasses.field(default_factory=dict)
    _guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _resolved: dict[tuple[str, str], tuple[Any, float]] = dataclasses.field(default_factory=dict)
    _discovery: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def status_lock(self, namespace: str, name: str) -> threading.Lock:
        """One lock per LLMServer: its status is computed and written by one thread at a time
        (kopf runs handlers of pod, StatefulSet and LLMServer events concurrently)."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Cluster:
        """In-cluster config when running in a pod, else `kubeconfig` / $KUBECONFIG."""
        if kubeconfig is None:
            try:
                k8s_config.load_incluster_config()
                api = k8s.ApiClient()
            except k8s_config.ConfigException:
                api = k8s_config.new_client_from_config()
        else:
            api = k8s_config.new_client_from_config(config_file=kubeconfig)
        return cls(api=api, dynamic=DynamicClient(api))

    def resource(self, api_version: str, kind: str) -> Any:
        """The dynamic client's resource for a kind; ResourceNotFoundError when the API server
        does not serve it (checked again after `_ABSENT_TTL_S`, e.g. a CRD installed later).

        Discovery runs under a lock: the client's lazy discoverer is not thread-safe, and kopf
        runs sync handlers in a thread pool.
        """
        key = (api_version, kind)
        with self._discovery:
            found, when = self._resolved.get(key, (None, 0.0))
            if found is not None:
                return found
            if when and time.monotonic() - when < _ABSENT_TTL_S:
                raise ResourceNotFoundError(f"{kind} ({api_version}) is not served")
            try:
                found = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                self._resolved[key] = (None, time.monotonic())
                raise
            self._resolved[key] = (found, time.monotonic())
            return found


@dataclasses.dataclass
class Applied:
    """What one pass did to the children."""

    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


# -- reconcile ----------------------------------------------------------------------------------


def reconcile(cluster: Cluster, config: OperatorConfig, body: JSON, log: Log) -> None:
    """Bring the children of LLMServer `body` in line with its spec, then write its status.

    Raises kopf.PermanentError for a spec the operator cannot act on (after writing a condition
    that says why), so kopf does not retry until the object changes (R25).
    """
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    try:
        llm = parse_spec(body.get("spec") or {})
        check_references(cluster, namespace, llm)
        manifests = _render(name, namespace, uid, llm, config)
        applied = apply_children(cluster, namespace, name, uid, manifests, log)
    except SpecError as exc:
        log.warning("LLMServer %s/%s: %s: %s", namespace, name, exc.reason, exc.message)
        write_status(
            cluster, namespace, name, log, problem=status.SpecProblem(exc.reason, exc.message)
        )
        raise kopf.PermanentError(f"{exc.reason}: {exc.message}") from exc
    if applied.created:
        _event(
            body, logging.INFO, reason="Created", message="created " + ", ".join(applied.created)
        )
    if applied.updated:
        _event(
            body, logging.INFO, reason="Updated", message="updated " + ", ".join(applied.updated)
        )
    if applied.deleted:
        _event(
            body, logging.INFO, reason="Deleted", message="deleted " + ", ".join(applied.deleted)
        )
    write_status(cluster, namespace, name, log)


def parse_spec(raw: JSON) -> spec.LLMServerSpec:
    """The typed spec; a SpecError with pydantic's messages when the API server let it through."""
    try:
        return spec.LLMServerSpec.model_validate(raw)
    except pydantic.ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SpecError("InvalidSpec", errors) from exc


def _render(
    name: str, namespace: str, uid: str, llm: spec.LLMServerSpec, config: OperatorConfig
) -> list[dict[str, Any]]:
    try:
        return render.render_children(name, namespace, uid, llm, config.render_config())
    except render.RenderError as exc:
        raise SpecError("InvalidSpec", str(exc)) from exc


def check_references(cluster: Cluster, namespace: str, llm: spec.LLMServerSpec) -> None:
    """The Secret and PVC that the spec names must exist (a 403 means: cannot tell; go on)."""
    ref = llm.api_key_secret_ref
    if ref is not None:
        secret = _get(cluster, "v1", "Secret", namespace, ref.name)
        if secret is None:
            raise SpecError(
                "MissingSecret",
                f"apiKeySecretRef: Secret {ref.name!r} not found in namespace {namespace!r}; "
                "create it, then change or annotate the LLMServer to retry",
            )
        if secret is not _UNKNOWN and ref.key not in (secret.get("data") or {}):
            raise SpecError(
                "MissingSecret", f"apiKeySecretRef: Secret {ref.name!r} has no key {ref.key!r}"
            )
    pvc = llm.model.pvc
    if (
        pvc is not None
        and _get(cluster, "v1", "PersistentVolumeClaim", namespace, pvc.claim_name) is None
    ):
        raise SpecError(
            "MissingVolume",
            f"model.pvc: PersistentVolumeClaim {pvc.claim_name!r} not found in namespace "
            f"{namespace!r}; create it, then change or annotate the LLMServer to retry",
        )


_UNKNOWN: dict[str, Any] = {}


def _get(cluster: Cluster, api_version: str, kind: str, namespace: str, name: str) -> JSON | None:
    """The object as a dict, None when absent, `_UNKNOWN` when we may not read it."""
    try:
        obj = cluster.resource(api_version, kind).get(name=name, namespace=namespace)
    except NotFoundError:
        return None
    except ApiException as exc:
        if exc.status == 403:
            logger.info("not allowed to read %s %s/%s; not checking it", kind, namespace, name)
            return _UNKNOWN
        raise
    result: dict[str, Any] = obj.to_dict()
    return result


# -- children -----------------------------------------------------------------------------------


def manifest_hash(manifest: JSON) -> str:
    """Stable hash of a rendered manifest (the applied-hash annotation's value)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_children(
    cluster: Cluster,
    namespace: str,
    name: str,
    uid: str,
    manifests: Sequence[JSON],
    log: Log,
) -> Applied:
    """Apply each manifest that differs from the live object; delete owned leftovers."""
    applied = Applied()
    for manifest in manifests:
        _apply_one(cluster, namespace, uid, manifest, applied, log)
    wanted = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    for api_version, kind in MANAGED_KINDS:
        _delete_leftovers(cluster, namespace, name, uid, api_version, kind, wanted, applied, log)
    return applied


def _apply_one(
    cluster: Cluster,
    namespace: str,
    uid: str,
    manifest: JSON,
    applied: Applied,
    log: Log,
) -> None:
    kind, child = manifest["kind"], manifest["metadata"]["name"]
    what = f"{kind} {child}"
    try:
        resource = cluster.resource(manifest["apiVersion"], kind)
    except ResourceNotFoundError:
        log.warning("%s not applied: the API server has no %s (CRD not installed?)", what, kind)
        return
    digest = manifest_hash(manifest)
    live = _get(cluster, manifest["apiVersion"], kind, namespace, child)
    if live is not None and live is not _UNKNOWN:
        owner = _controller_uid(live)
        if owner is not None and owner != uid:
            raise SpecError(
                "NameConflict", f"{what} already exists and belongs to another controller"
            )
        annotations = live.get("metadata", {}).get("annotations") or {}
        if owner == uid and annotations.get(ANNOTATION_APPLIED) == digest:
            applied.skipped.append(what)
            return
    body = _with_annotation(manifest, ANNOTATION_APPLIED, digest)
    log.info("write: apply %s/%s", namespace, what)
    resource.server_side_apply(
        body=body,
        name=child,
        namespace=namespace,
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
    )
    (applied.created if live is None else applied.updated).append(what)


def _with_annotation(manifest: JSON, key: str, value: str) -> dict[str, Any]:
    body = json.loads(json.dumps(manifest))
    body["metadata"].setdefault("annotations", {})[key] = value
    return dict(body)


def _controller_uid(obj: JSON) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _delete_leftovers(
    cluster: Cluster,
    namespace: str,
    name: str,
    uid: str,
    api_version: str,
    kind: str,
    wanted: set[tuple[str, str]],
    applied: Applied,
    log: Log,
) -> None:
    """Delete children of this kind that carry our label and owner but are no longer rendered."""
    try:
        resource = cluster.resource(api_version, kind)
    except ResourceNotFoundError:
        return
    items = resource.get(namespace=namespace, label_selector=f"{LABEL_NAME}={name}").to_dict()
    for item in items.get("items") or []:
        child = item["metadata"]["name"]
        if (kind, child) in wanted or _controller_uid(item) != uid:
            continue
        log.info("write: delete %s/%s %s", namespace, kind, child)
        try:
            resource.delete(name=child, namespace=namespace)
        except NotFoundError:
            continue
        applied.deleted.append(f"{kind} {child}")


# -- status -------------------------------------------------------------------------------------


def observe(cluster: Cluster, namespace: str, name: str, uid: str) -> status.Observed:
    """The head Deployment, engine StatefulSet and pods of LLMServer `name` (uid `uid`)."""
    selector = f"{LABEL_NAME}={name}"
    head = _owned_one(cluster, "Deployment", namespace, f"{selector},{LABEL_COMPONENT}=head", uid)
    engine = _owned_one(
        cluster, "StatefulSet", namespace, f"{selector},{LABEL_COMPONENT}=engine", uid
    )
    pods = cluster.resource("v1", "Pod").get(namespace=namespace, label_selector=selector)
    return status.Observed(head=head, engine=engine, pods=pods.to_dict().get("items") or [])


def _owned_one(cluster: Cluster, kind: str, namespace: str, selector: str, uid: str) -> JSON | None:
    found = cluster.resource("apps/v1", kind).get(namespace=namespace, label_selector=selector)
    items = [i for i in found.to_dict().get("items") or [] if _controller_uid(i) == uid]
    return items[0] if items else None


def refresh_status(cluster: Cluster, namespace: str, name: str, log: Log) -> None:
    """Recompute and write the status of LLMServer `namespace/name` (if it still exists).

    A spec problem recorded for the current generation stands: only a reconcile clears it.
    """
    write_status(cluster, namespace, name, log, keep_problem=True)


def write_status(
    cluster: Cluster,
    namespace: str,
    name: str,
    log: Log,
    problem: status.SpecProblem | None = None,
    *,
    keep_problem: bool = False,
) -> None:
    """Compute the status from fresh reads and patch it when it changed.

    The patch carries the resourceVersion it was computed from; a conflict (someone wrote in
    between) re-reads and recomputes, a bounded number of times (R25).
    """
    with cluster.status_lock(namespace, name):
        _write_status_locked(cluster, namespace, name, log, problem, keep_problem)


def _write_status_locked(
    cluster: Cluster,
    namespace: str,
    name: str,
    log: Log,
    problem: status.SpecProblem | None,
    keep_problem: bool,
) -> None:
    resource = cluster.resource(spec.API_VERSION, spec.KIND)
    for _ in range(_STATUS_RETRIES):
        try:
            body = resource.get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return
        new, old = _next_status(cluster, body, problem, keep_problem)
        if _same_status(new, old):
            return
        patch = {
            "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
            "status": new,
        }
        log.info("write: status of %s/%s", namespace, name)
        try:
            resource.status.patch(
                body=patch,
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            if exc.status == 409:
                log.info("status of %s/%s changed meanwhile; recomputing", namespace, name)
                continue
            raise
        _post_transitions(body, old, new)
        return
    log.warning("status of %s/%s not written: it kept changing", namespace, name)


def _next_status(
    cluster: Cluster, body: JSON, problem: status.SpecProblem | None, keep_problem: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(new status, current status) of LLMServer `body`."""
    meta = body["metadata"]
    old: dict[str, Any] = dict(body.get("status") or {})
    generation = int(meta.get("generation") or 0)
    now = datetime.datetime.now(datetime.UTC)
    previous = old.get("conditions") or []
    try:
        llm = parse_spec(body.get("spec") or {})
    except SpecError as exc:
        bad = status.SpecProblem(exc.reason, exc.message)
        computed = status.problem_status(
            generation=generation, problem=bad, previous=previous, now=now
        )
        return status.status_dict(computed), old
    observed = observe(cluster, meta["namespace"], meta["name"], meta["uid"])
    computed = status.compute_status(
        name=meta["name"],
        namespace=meta["namespace"],
        generation=generation,
        llm=llm,
        observed=observed,
        spec_hash=render.spec_hash(llm),
        previous=previous,
        problem=problem or (_standing_problem(old, generation) if keep_problem else None),
        now=now,
    )
    return status.status_dict(computed), old


def _standing_problem(old: JSON, generation: int) -> status.SpecProblem | None:
    """A spec problem recorded for this very generation still holds (pod events cannot clear it)."""
    for cond in old.get("conditions") or []:
        if (
            cond.get("type") == status.DEGRADED
            and cond.get("status") == "True"
            and cond.get("reason") in SPEC_PROBLEMS
            and cond.get("observedGeneration") == generation
        ):
            return status.SpecProblem(str(cond["reason"]), str(cond.get("message", "")))
    return None


def _same_status(new: JSON, old: JSON) -> bool:
    return all(old.get(key) == value for key, value in new.items())


def _event(obj: JSON, level: int, *, reason: str, message: str) -> None:
    """A Kubernetes Event on LLMServer `obj` (posted by kopf in the background)."""
    body = obj if isinstance(obj, kopf.Body) else kopf.Body(cast(kopf.RawBody, dict(obj)))
    post = kopf.info if level < logging.WARNING else kopf.warn
    post(body, reason=reason, message=message[:1000])


def _post_transitions(body: JSON, old: JSON, new: JSON) -> None:
    """Events for notable transitions: Ready flips, a new Degraded reason."""
    before = {c.get("type"): c for c in old.get("conditions") or []}
    after = {c.get("type"): c for c in new.get("conditions") or []}
    ready_old, ready_new = before.get(status.READY, {}), after.get(status.READY, {})
    if ready_new.get("status") != ready_old.get("status"):
        if ready_new.get("status") == "True":
            _event(body, logging.INFO, reason="Ready", message=str(ready_new.get("message", "")))
        elif ready_old:
            _event(
                body,
                logging.WARNING,
                reason="NotReady",
                message=f"{ready_new.get('reason')}: {ready_new.get('message', '')}",
            )
    deg_old, deg_new = before.get(status.DEGRADED, {}), after.get(status.DEGRADED, {})
    if deg_new.get("status") == "True" and (
        deg_old.get("status") != "True" or deg_old.get("reason") != deg_new.get("reason")
    ):
        _event(
            body,
            logging.WARNING,
            reason=str(deg_new.get("reason")),
            message=str(deg_new.get("message", "")),
        )
