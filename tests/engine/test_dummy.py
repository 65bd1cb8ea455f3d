"""DummyEngine: deterministic tokens, stop conditions, logprobs and scripted faults (in-process)."""

from __future__ import annotations

import pytest

from kubellm.engine.backend import InvalidRequest
from kubellm.engine.dummy import DummyBehaviour, DummyEngine, dummy_token
from kubellm.protocol.messages import AddRequest, RequestOutput, SamplingParams
from kubellm.protocol.settings import EngineSettings


def _engine(behaviour: str = "", **kwargs: object) -> DummyEngine:
    settings = EngineSettings.model_validate(
        {"engine_backend": "dummy", "dummy_behaviour": behaviour, **kwargs}
    )
    return DummyEngine(settings)


def _add(engine: DummyEngine, rid: str, prompt: tuple[int, ...], **sampling: object) -> None:
    params = SamplingParams(**{"max_tokens": 8, **sampling})  # type: ignore[arg-type]
    engine.add_request(
        AddRequest(request_id=rid, prompt_token_ids=prompt, sampling=params, arrival_time=0.0)
    )


def _run(engine: DummyEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the dummy engine did not finish")


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_facts_follow_settings() -> None:
    e = _engine()
    assert (e.model, e.max_model_len, e.vocab_size, e.supported_tasks) == (
        "dummy",
        2048,
        32000,
        ("generate",),
    )
    e = _engine(model="/m", max_model_len=64, max_num_seqs=3)
    assert (e.model, e.max_model_len, e.max_num_seqs) == ("/m", 64, 3)


def test_tokens_are_deterministic_and_stop_at_max_tokens() -> None:
    e = _engine()
    _add(e, "a", (5, 6, 7), max_tokens=6)
    _add(e, "b", (5, 6, 8), max_tokens=6)
    outs = _run(e)
    expected = [dummy_token((5, 6, 7), 3 + i) for i in range(6)]
    assert _tokens(outs["a"]) == expected
    assert _tokens(outs["b"]) != expected
    assert outs["a"][-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outs["a"][:-1])
    assert all(o.num_prompt_tokens == 3 for o in outs["a"])
    assert not e.has_work() and e.stats().num_running == 0


def test_stop_token_id_ends_the_request_unless_before_min_tokens() -> None:
    prompt = (1, 2)
    stop = dummy_token(prompt, len(prompt) + 2)  # the third generated token
    e = _engine()
    _add(e, "s", prompt, max_tokens=10, stop_token_ids=(stop,))
    _add(e, "m", prompt, max_tokens=10, stop_token_ids=(stop,), min_tokens=5)
    outs = _run(e)
    assert _tokens(outs["s"])[-1] == stop and len(_tokens(outs["s"])) == 3
    assert (outs["s"][-1].finish_reason, outs["s"][-1].stop_token_id) == ("stop", stop)
    assert stop not in _tokens(outs["m"])[:5]
    assert outs["m"][-1].finish_reason in ("length", "stop")


def test_max_model_len_ends_with_length_and_long_prompts_are_refused() -> None:
    e = _engine(max_model_len=16)
    _add(e, "a", tuple(range(12)), max_tokens=100)
    assert len(_tokens(_run(e)["a"])) == 4
    with pytest.raises(InvalidRequest, match="max_model_len"):
        _add(e, "b", tuple(range(16)))


def test_logprobs_are_well_formed() -> None:
    e = _engine()
    _add(e, "a", (3,), max_tokens=3, logprobs=4)
    _add(e, "b", (3,), max_tokens=3)
    outs = _run(e)
    for out in outs["a"]:
        assert out.new_logprobs is not None and len(out.new_logprobs) == len(out.new_token_ids)
        pos = out.new_logprobs[0]
        assert pos.sampled.token_id == out.new_token_ids[0] and pos.sampled.logprob <= 0
        values = [t.logprob for t in pos.top]
        assert len(pos.top) == 4 and values == sorted(values, reverse=True)
    assert all(o.new_logprobs is None for o in outs["b"])


def test_max_num_seqs_queues_and_abort_frees() -> None:
    e = _engine(max_num_seqs=2)
    for i in range(4):
        _add(e, f"r{i}", (i,), max_tokens=50)
    e.step()
    assert (e.stats().num_running, e.stats().num_waiting) == (2, 2)
    aborted = e.abort_requests(["r0", "r3", "unknown"])
    assert sorted(o.request_id for o in aborted) == ["r0", "r3"]
    assert all(o.finish_reason == "abort" for o in aborted)
    assert set(_run(e)) == {"r1", "r2"}


def test_duplicate_request_id_is_refused() -> None:
    e = _engine()
    _add(e, "a", (1,))
    with pytest.raises(InvalidRequest, match="already"):
        _add(e, "a", (1,))


def test_fail_prefix_fails_only_matching_requests() -> None:
    e = _engine("fail_prefix=bad-")
    _add(e, "bad-1", (1,))
    _add(e, "good", (1,), max_tokens=2)
    outs = _run(e)
    assert outs["bad-1"][-1].finish_reason == "error" and outs["bad-1"][-1].error
    assert outs["good"][-1].finish_reason == "length"


def test_raise_after_tokens_raises_in_step() -> None:
    e = _engine("raise_after_tokens=2")
    _add(e, "a", (1,), max_tokens=10)
    e.step()
    e.step()
    with pytest.raises(RuntimeError, match="raise_after_tokens"):
        e.step()


def test_startup_fail_raises() -> None:
    with pytest.raises(RuntimeError, match="startup_fail"):
        _engine("startup_fail=1")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nonsense", "expected key=value"),
        ("crash_after=3", "expected key=value"),
        ("token_delay_s=-1", "token_delay_s"),
        ("token_delay_s=nan", "token_delay_s"),
        ("crash_after_tokens=x", "crash_after_tokens"),
        ("startup_fail=maybe", "startup_fail"),
        ("fail_prefix=", "fail_prefix"),
    ],
)
def test_bad_behaviour_strings_get_clear_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DummyBehaviour.parse(text)


def test_behaviour_string_is_parsed() -> None:
    b = DummyBehaviour.parse(
        " token_delay_s=0.5, crash_after_tokens=3,fail_prefix=x-,startup_fail=0"
    )
    assert (b.token_delay_s, b.crash_after_tokens, b.fail_prefix, b.startup_fail) == (
        0.5,
        3,
        "x-",
        False,
    )
    assert DummyBehaviour.parse("") == DummyBehaviour()
