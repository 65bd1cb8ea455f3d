"""kubellm.operator.status: observed children → LLMServer status (pure, no cluster)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from kubellm.operator import render, spec, status

NOW = datetime.datetime(2026, 11, 21, 12, 0, 0, tzinfo=datetime.UTC)
EARLIER = "2026-11-21T11:00:00Z"
NAME, NS = "qwen", "team-a"


def llm(engines: int = 2) -> spec.LLMServerSpec:
    return spec.LLMServerSpec.model_validate(
        {"model": {"path": "/models/qwen3"}, "engine": {"replicas": engines}}
    )


SPEC = llm()
HASH = render.spec_hash(SPEC)


def workload(
    kind: str,
    replicas: int,
    ready: int,
    *,
    updated: int | None = None,
    generation: int = 1,
    observed_generation: int = 1,
    template_hash: str = HASH,
    revisions: tuple[str, str] | None = None,
) -> dict[str, Any]:
    st: dict[str, Any] = {
        "observedGeneration": observed_generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": replicas if updated is None else updated,
    }
    if revisions is not None:
        st["currentRevision"], st["updateRevision"] = revisions
    return {
        "kind": kind,
        "metadata": {"name": f"{NAME}-{kind.lower()}", "generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"labels": {status.LABEL_SPEC_HASH: template_hash}}},
        },
        "status": st,
    }


def head(ready: int = 1, **kw: Any) -> dict[str, Any]:
    return workload("Deployment", 1, ready, **kw)


def engine(replicas: int = 2, ready: int = 2, **kw: Any) -> dict[str, Any]:
    return workload("StatefulSet", replicas, ready, **kw)


def pod(
    name: str,
    *,
    unschedulable: str = "",
    waiting: str = "",
    init: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    st: dict[str, Any] = {"conditions": []}
    if unschedulable:
        st["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        )
    if waiting:
        cs = {
            "name": "init" if init else "engine",
            "restartCount": 4,
            "state": {"waiting": {"reason": waiting, "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
        }
        st["initContainerStatuses" if init else "containerStatuses"] = [cs]
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = EARLIER
    return {"metadata": meta, "status": st}


def compute(
    observed: status.Observed,
    *,
    llm_spec: spec.LLMServerSpec = SPEC,
    previous: list[dict[str, Any]] | None = None,
    problem: status.SpecProblem | None = None,
) -> dict[str, Any]:
    result = status.compute_status(
        name=NAME,
        namespace=NS,
        generation=3,
        llm=llm_spec,
        observed=observed,
        spec_hash=render.spec_hash(llm_spec),
        previous=previous or [],
        problem=problem,
        now=NOW,
    )
    return status.status_dict(result)


def conds(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


GPU_MSG = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."

CASES = {
    "all ready": (
        status.Observed(head(), engine()),
        {
            "Ready": ("True", "Ready"),
            "Progressing": ("False", "Complete"),
            "Degraded": ("False", "Healthy"),
        },
    ),
    "nothing created yet": (
        status.Observed(),
        {
            "Ready": ("False", "Creating"),
            "Progressing": ("True", "Creating"),
            "Degraded": ("False", "Healthy"),
        },
    ),
    "engines not ready yet": (
        status.Observed(head(), engine(ready=1)),
        {
            "Ready": ("False", "WaitingForPods"),
            "Progressing": ("True", "WaitingForPods"),
            "Degraded": ("False", "Healthy"),
        },
    ),
    "unschedulable for lack of GPUs": (
        status.Observed(head(), engine(ready=1), [pod(f"{NAME}-engine-1", unschedulable=GPU_MSG)]),
        {
            "Ready": ("False", "Unschedulable"),
            "Progressing": ("True", "WaitingForPods"),
            "Degraded": ("True", "Unschedulable"),
        },
    ),
    "crash looping engine": (
        status.Observed(
            head(), engine(ready=1), [pod(f"{NAME}-engine-0", waiting="CrashLoopBackOff")]
        ),
        {
            "Ready": ("False", "CrashLoop"),
            "Progressing": ("True", "WaitingForPods"),
            "Degraded": ("True", "CrashLoop"),
        },
    ),
    "crash looping init container": (
        status.Observed(
            head(),
            engine(ready=1),
            [pod(f"{NAME}-engine-0", waiting="CrashLoopBackOff", init=True)],
        ),
        {"Ready": ("False", "CrashLoop"), "Degraded": ("True", "CrashLoop")},
    ),
    "image cannot be pulled": (
        status.Observed(
            head(ready=0), engine(), [pod(f"{NAME}-head-x", waiting="ImagePullBackOff")]
        ),
        {"Ready": ("False", "ImagePull"), "Degraded": ("True", "ImagePull")},
    ),
    "a pod being deleted does not count": (
        status.Observed(
            head(), engine(), [pod(f"{NAME}-engine-0", waiting="CrashLoopBackOff", deleting=True)]
        ),
        {"Ready": ("True", "Ready"), "Degraded": ("False", "Healthy")},
    ),
    "statefulset rolling: pods not all updated": (
        status.Observed(head(), engine(updated=1)),
        {"Ready": ("True", "Ready"), "Progressing": ("True", "Rolling")},
    ),
    "deployment generation not observed yet": (
        status.Observed(head(generation=2, observed_generation=1), engine()),
        {"Progressing": ("True", "Rolling")},
    ),
    "new spec not applied to the template yet": (
        status.Observed(head(), engine(template_hash="old")),
        {"Progressing": ("True", "Rolling")},
    ),
    "statefulset revision rolling out": (
        status.Observed(head(), engine(revisions=("rev-1", "rev-2"))),
        {"Progressing": ("True", "Rolling")},
    ),
    "engine StatefulSet missing": (
        status.Observed(head(), None),
        {"Ready": ("False", "Creating"), "Progressing": ("True", "Creating")},
    ),
}


@pytest.mark.parametrize("observed, expected", CASES.values(), ids=CASES.keys())
def test_conditions(observed: status.Observed, expected: dict[str, tuple[str, str]]) -> None:
    got = conds(compute(observed))
    assert set(got) == {"Ready", "Progressing", "Degraded"}
    for ctype, want in expected.items():
        assert got[ctype] == want, (ctype, got)


def test_counts_url_selector_generation() -> None:
    result = compute(status.Observed(head(), engine(ready=1)))
    assert result["head"] == {"ready": 1, "desired": 1}
    assert result["engine"] == {"ready": 1, "desired": 2}
    assert result["observedGeneration"] == 3
    assert result["url"] == render.url(NAME, NS)
    assert result["selector"] == render.selector(NAME)
    assert result["specHash"] == HASH
    assert all(c["observedGeneration"] == 3 for c in result["conditions"])


def test_messages_say_why() -> None:
    result = compute(
        status.Observed(head(), engine(ready=1), [pod(f"{NAME}-engine-1", unschedulable=GPU_MSG)])
    )
    ready = next(c for c in result["conditions"] if c["type"] == "Ready")
    assert f"pod {NAME}-engine-1 is unschedulable" in ready["message"]
    assert "Insufficient nvidia.com/gpu" in ready["message"]
    crash = compute(
        status.Observed(
            head(), engine(ready=1), [pod(f"{NAME}-engine-0", waiting="CrashLoopBackOff")]
        )
    )
    degraded = next(c for c in crash["conditions"] if c["type"] == "Degraded")
    assert "CrashLoopBackOff" in degraded["message"]
    assert "4 restarts" in degraded["message"] and "exit code 1" in degraded["message"]


def test_unschedulable_reported_before_crash_loop_and_list_is_capped() -> None:
    pods = [pod(f"{NAME}-engine-{i}", waiting="CrashLoopBackOff") for i in range(4)]
    pods.append(pod(f"{NAME}-engine-9", unschedulable=GPU_MSG))
    result = compute(status.Observed(head(), engine(replicas=5, ready=0), pods))
    degraded = next(c for c in result["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "Unschedulable"
    assert degraded["message"].startswith(f"pod {NAME}-engine-9 is unschedulable")
    assert degraded["message"].endswith("and 2 more")


def test_spec_problem_wins() -> None:
    problem = status.SpecProblem("MissingSecret", "Secret 'keys' not found")
    result = compute(status.Observed(head(), engine()), problem=problem)
    assert conds(result) == {
        "Ready": ("False", "MissingSecret"),
        "Progressing": ("False", "MissingSecret"),
        "Degraded": ("True", "MissingSecret"),
    }
    ready = next(c for c in result["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "Secret 'keys' not found"


def test_scaled_to_zero_engines_needs_no_statefulset() -> None:
    zero = llm(engines=0)
    result = compute(
        status.Observed(head(template_hash=render.spec_hash(zero)), None), llm_spec=zero
    )
    assert conds(result)["Ready"] == ("True", "Ready")
    assert result["engine"] == {"ready": 0, "desired": 0}


def test_transition_time_kept_while_status_unchanged() -> None:
    previous = [
        {"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": EARLIER},
        {
            "type": "Progressing",
            "status": "True",
            "reason": "Rolling",
            "lastTransitionTime": EARLIER,
        },
        {"type": "Degraded", "status": "False", "reason": "Healthy", "lastTransitionTime": EARLIER},
    ]
    result = compute(status.Observed(head(), engine()), previous=previous)
    times = {c["type"]: c["lastTransitionTime"] for c in result["conditions"]}
    assert times["Ready"] == EARLIER  # still True
    assert times["Degraded"] == EARLIER  # still False
    assert times["Progressing"] == "2026-11-21T12:00:00Z"  # True → False now


def test_problem_status_without_a_parsable_spec() -> None:
    problem = status.SpecProblem("InvalidSpec", "engine.replicas: must be >= 0")
    result = status.status_dict(status.problem_status(generation=7, problem=problem, now=NOW))
    assert result["observedGeneration"] == 7
    assert conds(result)["Ready"] == ("False", "InvalidSpec")
    assert conds(result)["Degraded"] == ("True", "InvalidSpec")


def test_deterministic() -> None:
    observed = status.Observed(
        head(), engine(ready=1), [pod(f"{NAME}-engine-1", unschedulable=GPU_MSG)]
    )
    assert compute(observed) == compute(observed)
