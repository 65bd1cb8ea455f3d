"""Pure: the observed children of one LLMServer → its status.

Inputs are objects as the API returns them (camelCase dicts): the head Deployment, the engine
StatefulSet and the pods labelled with the LLMServer's name. Output is `spec.LLMServerStatus`
with counts and three conditions:

- Ready: every desired head and engine pod is ready.
- Progressing: the children are being created, rolled out or are waiting for pods.
- Degraded: something needs a human: a spec only the operator can reject (InvalidSpec,
  MissingSecret, ...), a pod the scheduler cannot place (Unschedulable), a crash-looping
  container (CrashLoop) or an image that cannot be pulled (ImagePull).

A condition keeps its lastTransitionTime while its status does not change.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from kubellm.operator import render, spec

LABEL_SPEC_HASH = render.SPEC_HASH_LABEL

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"

UNSCHEDULABLE = "Unschedulable"
CRASH_LOOP = "CrashLoop"
IMAGE_PULL = "ImagePull"
CONTAINER_CONFIG = "ContainerConfig"
ROLLING = "Rolling"
CREATING = "Creating"
WAITING_FOR_PODS = "WaitingForPods"
COMPLETE = "Complete"
HEALTHY = "Healthy"

# Container waiting reasons (kubelet) → our condition reason. Order in _TROUBLE_ORDER is the
# order in which problems are reported when several exist.
_WAITING_REASONS = {
    "CrashLoopBackOff": CRASH_LOOP,
    "ImagePullBackOff": IMAGE_PULL,
    "ErrImagePull": IMAGE_PULL,
    "InvalidImageName": IMAGE_PULL,
    "CreateContainerConfigError": CONTAINER_CONFIG,
}
_TROUBLE_ORDER = (UNSCHEDULABLE, CRASH_LOOP, IMAGE_PULL, CONTAINER_CONFIG)
_MAX_LISTED = 3

JSON = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Observed:
    """What exists in the cluster for one LLMServer."""

    head: JSON | None = None
    """The head Deployment, or None when it does not exist (yet)."""
    engine: JSON | None = None
    """The engine StatefulSet, or None when it does not exist (yet)."""
    pods: Sequence[JSON] = ()
    """Pods labelled serving.kubellm.io/name=<name> (head and engine)."""


@dataclasses.dataclass(frozen=True)
class SpecProblem:
    """A spec error that only the operator can detect (the API server accepted the object)."""

    reason: str
    """CamelCase condition reason, e.g. InvalidSpec, MissingSecret, MissingVolume."""
    message: str
    """What is wrong and how to fix it, for `kubectl describe`."""


@dataclasses.dataclass(frozen=True)
class _Finding:
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class _Cond:
    type: str
    status: bool
    reason: str
    message: str


def compute_status(
    *,
    name: str,
    namespace: str,
    generation: int,
    llm: spec.LLMServerSpec,
    observed: Observed,
    spec_hash: str,
    previous: Sequence[JSON] = (),
    problem: SpecProblem | None = None,
    now: datetime.datetime,
) -> spec.LLMServerStatus:
    """The status of LLMServer `namespace/name` at `generation` given what is observed.

    `previous` holds the conditions currently in the object's status (to keep transition times).
    """
    head_ready, engine_ready = _ready_count(observed.head), _ready_count(observed.engine)
    conds = _conditions(llm, observed, spec_hash, problem, head_ready, engine_ready)
    data: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [_condition_dict(c, previous, generation, now) for c in conds],
        "head": {"ready": head_ready, "desired": llm.head.replicas},
        "engine": {"ready": engine_ready, "desired": llm.engine.replicas},
        "url": render.url(name, namespace),
        "selector": render.selector(name),
        "specHash": spec_hash,
    }
    return spec.LLMServerStatus.model_validate(data)


def problem_status(
    *,
    generation: int,
    problem: SpecProblem,
    previous: Sequence[JSON] = (),
    now: datetime.datetime,
) -> spec.LLMServerStatus:
    """The status of an LLMServer whose spec does not even parse: conditions only."""
    conds = [_condition_dict(c, previous, generation, now) for c in _problem_conditions(problem)]
    return spec.LLMServerStatus.model_validate(
        {"observedGeneration": generation, "conditions": conds}
    )


def status_dict(status: spec.LLMServerStatus) -> dict[str, Any]:
    """The status as the API stores it (camelCase, JSON types, no nulls)."""
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


def format_time(when: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(
    llm: spec.LLMServerSpec,
    observed: Observed,
    spec_hash: str,
    problem: SpecProblem | None,
    head_ready: int,
    engine_ready: int,
) -> list[_Cond]:
    if problem is not None:
        return _problem_conditions(problem)
    counts = f"head {head_ready}/{llm.head.replicas} ready, engines {engine_ready}/" + str(
        llm.engine.replicas
    )
    missing = _missing(llm, observed)
    rolling = _rolling(observed, spec_hash)
    troubles = _pod_troubles(observed.pods)
    all_ready = not missing and head_ready >= llm.head.replicas
    all_ready = all_ready and engine_ready >= llm.engine.replicas
    if all_ready:
        ready = _Cond(READY, True, READY, counts)
    elif troubles:
        ready = _Cond(READY, False, troubles[0].reason, _join(troubles))
    else:
        why = missing or rolling or counts
        ready = _Cond(READY, False, _progress_reason(missing, rolling), why)
    if missing or rolling or not all_ready:
        why = missing or rolling or counts
        progressing = _Cond(PROGRESSING, True, _progress_reason(missing, rolling), why)
    else:
        progressing = _Cond(PROGRESSING, False, COMPLETE, "rollout complete; " + counts)
    if troubles:
        degraded = _Cond(DEGRADED, True, troubles[0].reason, _join(troubles))
    else:
        degraded = _Cond(DEGRADED, False, HEALTHY, "no pod problems seen")
    return [ready, progressing, degraded]


def _problem_conditions(problem: SpecProblem) -> list[_Cond]:
    return [
        _Cond(READY, False, problem.reason, problem.message),
        _Cond(PROGRESSING, False, problem.reason, "the operator cannot act on this spec"),
        _Cond(DEGRADED, True, problem.reason, problem.message),
    ]


def _progress_reason(missing: str, rolling: str) -> str:
    if missing:
        return CREATING
    if rolling:
        return ROLLING
    return WAITING_FOR_PODS


def _missing(llm: spec.LLMServerSpec, observed: Observed) -> str:
    """A message naming the workloads that do not exist yet; empty when all exist."""
    absent = []
    if observed.head is None:
        absent.append("head Deployment")
    if observed.engine is None and llm.engine.replicas > 0:
        absent.append("engine StatefulSet")
    return f"waiting for the {' and '.join(absent)} to be created" if absent else ""


def _rolling(observed: Observed, spec_hash: str) -> str:
    """A message saying which workload is still rolling out; empty when none is."""
    for what, obj in (("head Deployment", observed.head), ("engine StatefulSet", observed.engine)):
        if obj is None:
            continue
        why = _workload_rolling(obj, spec_hash)
        if why:
            return f"{what} {obj.get('metadata', {}).get('name', '?')}: {why}"
    return ""


def _workload_rolling(obj: JSON, spec_hash: str) -> str:
    meta, wspec, st = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    template_labels = wspec.get("template", {}).get("metadata", {}).get("labels", {})
    live_hash = template_labels.get(LABEL_SPEC_HASH)
    if live_hash is not None and live_hash != spec_hash:
        return "the new spec is not applied yet"
    if meta.get("generation", 0) > st.get("observedGeneration", 0):
        return "the controller has not observed the latest generation yet"
    desired = int(wspec.get("replicas", 1))
    updated = int(st.get("updatedReplicas", 0))
    if updated < desired:
        return f"{updated}/{desired} pods updated"
    if int(st.get("replicas", 0)) > updated:
        return f"{int(st.get('replicas', 0)) - updated} old pods still running"
    current, update = st.get("currentRevision"), st.get("updateRevision")
    if current and update and current != update:
        return f"revision {update} rolling out (current {current})"
    return ""


def _ready_count(obj: JSON | None) -> int:
    if obj is None:
        return 0
    return int(obj.get("status", {}).get("readyReplicas", 0) or 0)


def _pod_troubles(pods: Sequence[JSON]) -> list[_Finding]:
    found: list[_Finding] = []
    for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", ""))):
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        found.extend(_one_pod_troubles(pod))
    return sorted(found, key=lambda f: _TROUBLE_ORDER.index(f.reason))


def _one_pod_troubles(pod: JSON) -> list[_Finding]:
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status", {})
    found = []
    for cond in status.get("conditions", []) or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            why = cond.get("message") or "no node fits"
            found.append(_Finding(UNSCHEDULABLE, f"pod {name} is unschedulable: {why}"))
    statuses = list(status.get("initContainerStatuses", []) or [])
    statuses += list(status.get("containerStatuses", []) or [])
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = _WAITING_REASONS.get(waiting.get("reason", ""))
        if reason is not None:
            found.append(_Finding(reason, _container_message(name, cs, waiting)))
    return found


def _container_message(pod: str, cs: JSON, waiting: JSON) -> str:
    msg = f"pod {pod} container {cs.get('name', '?')}: {waiting.get('reason')}"
    if waiting.get("message"):
        msg += f" ({waiting['message']})"
    restarts = int(cs.get("restartCount", 0) or 0)
    if restarts:
        msg += f", {restarts} restarts"
    last = (cs.get("lastState") or {}).get("terminated") or {}
    if last:
        msg += f"; last exit code {last.get('exitCode')}"
        if last.get("reason"):
            msg += f" ({last['reason']})"
    return msg


def _join(findings: Sequence[_Finding]) -> str:
    listed = "; ".join(f.message for f in findings[:_MAX_LISTED])
    more = len(findings) - _MAX_LISTED
    return listed + (f"; and {more} more" if more > 0 else "")


def _condition_dict(
    cond: _Cond, previous: Sequence[JSON], generation: int, now: datetime.datetime
) -> dict[str, Any]:
    status = "True" if cond.status else "False"
    since = format_time(now)
    for old in previous:
        if old.get("type") == cond.type and old.get("status") == status:
            since = str(old.get("lastTransitionTime") or since)
            break
    return {
        "type": cond.type,
        "status": status,
        "reason": cond.reason,
        "message": cond.message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
