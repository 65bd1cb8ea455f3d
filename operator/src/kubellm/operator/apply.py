"""The only module that talks to the Kubernetes API.

`reconcile` renders an LLMServer's children, applies what changed (server-side apply, field
manager `kubellm-operator`, forced), deletes the children it no longer renders, and writes the
status; `refresh_status` only recomputes the status (on child and pod events). Each write is
logged once at INFO as "write: ..." so that tests and humans can see there were none (R24).

A child is skipped when its live `serving.kubellm.io/applied-hash` annotation equals the hash of
the manifest about to be applied and no other writer changed a field the operator applied
(`kubellm.operator.drift`, from managedFields): an unchanged LLMServer costs reads only. A drifted
child is applied again, forced, fields that others added under `spec` are removed, and a Warning
Event says so. `check_child` runs that check on each child event, so drift is undone promptly.

409 Conflict (and 422 from a failed JSON-patch test) is retried after a re-read, with bounded
backoff (R25).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import kopf
import pydantic
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException, NotFoundError, ResourceNotFoundError

from kubellm.operator import drift, render, rollout, spec, status
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
_CONFLICT_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)
"""Sleeps before each retry of a write that met a concurrent writer (409 / 422 test failed)."""
_ABSENT_TTL_S = 300.0
_MEMORY_LIMIT = 10_000
"""Entries kept in Cluster.clean / Cluster.unrestorable before they are forgotten wholesale."""


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
    _child_locks: dict[tuple[str, str], threading.Lock] = dataclasses.field(default_factory=dict)
    unrestorable: dict[tuple[str, str], frozenset[drift.Path]] = dataclasses.field(
        default_factory=dict
    )
    """(child uid, manifest hash) → drift paths that a restore did not clear: never retried, so a
    rule that does not fit some field cannot make the operator write in a loop."""
    clean: dict[str, str] = dataclasses.field(default_factory=dict)
    """child uid → fingerprint of its managedFields when it was last found free of drift: child
    events that change only status (most of them) then cost no read at all."""
    _guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _resolved: dict[tuple[str, str], tuple[Any, float]] = dataclasses.field(default_factory=dict)
    _discovery: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def status_lock(self, namespace: str, name: str) -> threading.Lock:
        """One lock per LLMServer: its status is computed and written by one thread at a time
        (kopf runs handlers of pod, StatefulSet and LLMServer events concurrently)."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def children_lock(self, namespace: str, name: str) -> threading.Lock:
        """One lock per LLMServer for applying its children: a reconcile and a drift check
        triggered by a child event never restore the same drift twice."""
        with self._guard:
            return self._child_locks.setdefault((namespace, name), threading.Lock())

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
    drifted: list[str] = dataclasses.field(default_factory=list)
    """Descriptions of children that another writer had changed and that were restored."""


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
        replaced = rollout.replace_stale_engines(
            cluster, namespace, name, render.spec_hash(llm), log
        )
    except SpecError as exc:
        log.warning("LLMServer %s/%s: %s: %s", namespace, name, exc.reason, exc.message)
        write_status(
            cluster, namespace, name, log, problem=status.SpecProblem(exc.reason, exc.message)
        )
        raise kopf.PermanentError(f"{exc.reason}: {exc.message}") from exc
    _post_applied(body, applied)
    if replaced:
        message = f"replaced engine pods of the previous spec together: {', '.join(replaced)}"
        _event(body, logging.INFO, reason="Rolling", message=message)
    write_status(cluster, namespace, name, log)


def _post_applied(body: JSON, applied: Applied) -> None:
    """Events for what one pass did: Created / Updated / Deleted, and a Warning per drift."""
    for reason, done in (
        ("Created", applied.created),
        ("Updated", applied.updated),
        ("Deleted", applied.deleted),
    ):
        if done:
            _event(body, logging.INFO, reason=reason, message=f"{reason.lower()} {', '.join(done)}")
    for what in applied.drifted:
        _event(body, logging.WARNING, reason="Drift", message=f"Drift: {what}")


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
    """Apply each manifest that differs from (or drifted on) the live object; delete owned
    leftovers."""
    applied = Applied()
    with cluster.children_lock(namespace, name):
        for manifest in manifests:
            _apply_one(cluster, namespace, uid, manifest, applied, log)
        wanted = {(m["kind"], m["metadata"]["name"]) for m in manifests}
        for api_version, kind in MANAGED_KINDS:
            _delete_leftovers(
                cluster, namespace, name, uid, api_version, kind, wanted, applied, log
            )
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
    body = _with_annotation(manifest, ANNOTATION_APPLIED, digest)
    live = _get(cluster, manifest["apiVersion"], kind, namespace, child)
    if live is not None and live is not _UNKNOWN:
        owner = _controller_uid(live)
        if owner is not None and owner != uid:
            raise SpecError(
                "NameConflict", f"{what} already exists and belongs to another controller"
            )
        annotations = live.get("metadata", {}).get("annotations") or {}
        if owner == uid and annotations.get(ANNOTATION_APPLIED) == digest:
            changes = drifted(cluster, body, live)
            if not changes:
                applied.skipped.append(what)
                return
            _restore(cluster, resource, body, changes, applied, log)
            return
    log.info("write: apply %s/%s", namespace, what)
    _retry_conflicts(what, log, lambda: _ssa(resource, body))
    (applied.created if live is None else applied.updated).append(what)


def _ssa(resource: Any, body: JSON) -> dict[str, Any]:
    """Server-side apply of `body`, forced, as the operator's field manager; the result."""
    meta = body["metadata"]
    result = resource.server_side_apply(
        body=body,
        name=meta["name"],
        namespace=meta["namespace"],
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
    )
    out: dict[str, Any] = result.to_dict()
    return out


def drifted(cluster: Cluster, body: JSON, live: JSON) -> list[drift.Change]:
    """What other writers changed in `live` since the operator applied `body` (see drift.py),
    less what an earlier restore of this very manifest could not clear."""
    changes = drift.find_drift(body, live, FIELD_MANAGER)
    key = (str(live.get("metadata", {}).get("uid")), manifest_hash(body))
    stuck = cluster.unrestorable.get(key, frozenset())
    return [c for c in changes if c.path not in stuck]


def _restore(
    cluster: Cluster,
    resource: Any,
    body: JSON,
    changes: list[drift.Change],
    applied: Applied,
    log: Log,
) -> None:
    """Undo drift: forced apply (takes declared fields back), then remove the fields others
    added under spec. Drift that survives this is remembered and not retried (no write loop)."""
    meta = body["metadata"]
    kind, child, namespace = body["kind"], meta["name"], meta["namespace"]
    what = drift.describe(kind, child, changes)
    log.warning("drift in namespace %s: %s; restoring", namespace, what)
    log.info("write: apply %s/%s %s (drift)", namespace, kind, child)

    def restore() -> dict[str, Any]:
        result = _ssa(resource, body)
        patch = drift.removal_patch(drift.find_drift(body, result, FIELD_MANAGER), result)
        if not patch:
            return result
        log.info("write: remove added fields of %s/%s %s", namespace, kind, child)
        try:
            patched = resource.patch(
                body=patch,
                name=child,
                namespace=namespace,
                content_type="application/json-patch+json",
                field_manager=FIELD_MANAGER,
            )
        except ApiException as exc:
            if exc.status == 422:  # a `test` failed: those fields changed meanwhile
                raise _Stale(f"{kind} {child} changed between apply and patch") from exc
            raise
        out: dict[str, Any] = patched.to_dict()
        return out

    result = _retry_conflicts(f"{kind} {child}", log, restore)
    left = drift.find_drift(body, result, FIELD_MANAGER)
    if left:
        if len(cluster.unrestorable) > _MEMORY_LIMIT:
            cluster.unrestorable.clear()
        key = (str(result["metadata"]["uid"]), manifest_hash(body))
        cluster.unrestorable[key] = frozenset(c.path for c in left)
        log.warning(
            "drift not undone, not retried until the LLMServer changes: %s/%s",
            namespace,
            drift.describe(kind, child, left),
        )
    applied.drifted.append(f"{what}; {'not all restored' if left else 'restored'}")


T = TypeVar("T")


class _Stale(Exception):
    """A guarded write found the object changed since it was read (a failed JSON-patch test)."""


def _retry_conflicts(what: str, log: Log, write: Callable[[], T]) -> T:
    """Run `write` (which reads what it needs afresh); on 409 Conflict or `_Stale` (the 422 of a
    failed JSON-patch test) sleep and run it again, a bounded number of times."""
    for pause in _CONFLICT_BACKOFF_S:
        try:
            return write()
        except (ApiException, _Stale) as exc:
            if isinstance(exc, ApiException) and exc.status != 409:
                raise
            code = exc.status if isinstance(exc, ApiException) else "stale"
            log.info("%s changed meanwhile (%s); retrying in %.1f s", what, code, pause)
            time.sleep(pause)
    return write()


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


# -- child events: drift ------------------------------------------------------------------------


def check_child(
    cluster: Cluster, config: OperatorConfig, child: JSON, event_type: str | None, log: Log
) -> None:
    """On an event of child `child` (Deployment, StatefulSet, Service, PDB, NetworkPolicy):
    when another writer changed what the operator applied, or deleted the child, apply the
    LLMServer's children again (`apply_children` restores and reports) and post the Events.

    Reads only when nothing drifted. A child whose applied-hash differs from the current render
    is left to the LLMServer's own reconcile (a spec change on its way), as is any LLMServer that
    cannot be rendered or is being deleted.
    """
    meta = child["metadata"]
    namespace, name = meta.get("namespace"), (meta.get("labels") or {}).get(LABEL_NAME)
    owner_uid = _controller_uid(child)
    if not namespace or not name or owner_uid is None:
        return
    fingerprint = _fingerprint(child)
    if event_type == "DELETED":
        cluster.clean.pop(str(meta.get("uid")), None)
    elif cluster.clean.get(str(meta.get("uid"))) == fingerprint:
        return  # only status (or nothing the rule looks at) changed since it was found clean
    try:
        body = cluster.resource(spec.API_VERSION, spec.KIND).get(name=name, namespace=namespace)
    except NotFoundError:
        return
    owner = body.to_dict()
    if owner["metadata"]["uid"] != owner_uid or owner["metadata"].get("deletionTimestamp"):
        return
    try:
        manifests = _render(name, namespace, owner_uid, parse_spec(owner.get("spec") or {}), config)
    except SpecError:
        return  # the reconcile reports it
    wanted = [
        m for m in manifests if (m["kind"], m["metadata"]["name"]) == (child["kind"], meta["name"])
    ]
    if not wanted or not _needs_apply(cluster, wanted[0], child, event_type, fingerprint):
        return
    if event_type == "DELETED":
        log.warning(
            "drift: %s %s/%s was deleted; recreating", child["kind"], namespace, meta["name"]
        )
    applied = apply_children(cluster, namespace, name, owner_uid, manifests, log)
    if event_type == "DELETED" and applied.created:
        applied.drifted += [f"{what.lower()} was deleted; recreated" for what in applied.created]
        applied.created = []
    _post_applied(owner, applied)


def _needs_apply(
    cluster: Cluster, manifest: JSON, child: JSON, event_type: str | None, fingerprint: str
) -> bool:
    """Whether child `child`, as its event shows it, has drifted from `manifest` (or is gone).
    A child found clean is remembered by `fingerprint`."""
    if event_type == "DELETED":
        return True
    digest = manifest_hash(manifest)
    annotations = child["metadata"].get("annotations") or {}
    if annotations.get(ANNOTATION_APPLIED) != digest:
        return False
    if drifted(cluster, _with_annotation(manifest, ANNOTATION_APPLIED, digest), child):
        return True
    if len(cluster.clean) > _MEMORY_LIMIT:
        cluster.clean.clear()
    cluster.clean[str(child["metadata"].get("uid"))] = fingerprint
    return False


def _fingerprint(child: JSON) -> str:
    """What the drift rule reads of a child, less status and timestamps: its applied-hash and
    the managedFields entries of the main resource and `scale`."""
    meta = child["metadata"]
    entries = [
        {k: v for k, v in entry.items() if k != "time"}
        for entry in meta.get("managedFields") or []
        if (entry.get("subresource") or "") in drift.OUR_SUBRESOURCES
    ]
    applied = (meta.get("annotations") or {}).get(ANNOTATION_APPLIED)
    return manifest_hash({"applied": applied, "entries": entries})


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
    for attempt in range(_STATUS_RETRIES):
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
                time.sleep(_CONFLICT_BACKOFF_S[min(attempt, len(_CONFLICT_BACKOFF_S) - 1)])
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
