"""LLMEngine and LLM with a fake executor that simulates a paged KV cache.

The fake writes (token, position) into the KV slots of every computed token and, to sample,
reads the sequence's whole context back from the cache through its block table. A wrong block
table, a wrong prefix hit or a block reused while still referenced shows up as a KV mismatch.
The next token is a deterministic function of that context, so outputs do not depend on
batching, chunking, preemption or prefix caching.
"""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import pytest

from kubellm.engine.backend import EngineBackend, InvalidRequest
from kubellm.engine.llm import LLM
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.sequence import SampleResult, SchedulerOutput
from kubellm.protocol.messages import (
    AddRequest,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from kubellm.protocol.settings import EngineSettings

VOCAB = 1000
EOS = 0
BS = 4


class KVMismatch(AssertionError):
    pass


class FakeExecutor:
    def __init__(
        self, num_blocks: int, block_size: int = BS, script: dict[str, list[int]] | None = None
    ) -> None:
        self.block_size = block_size
        self.kv: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.script = script or {}
        self.batches: list[list[tuple[str, int, int, bool]]] = []

    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, batch: SchedulerOutput) -> list[SampleResult]:
        self.batches.append(
            [
                (e.seq.request_id, e.seq.num_computed_tokens, e.num_new_tokens, e.sample)
                for e in batch.scheduled
            ]
        )
        for e in batch.scheduled:  # write every new token's K/V first, like a real forward
            start = e.seq.num_computed_tokens
            for pos in range(start, start + e.num_new_tokens):
                self.kv[self._slot(e.seq.block_ids, pos)] = (e.seq.token_ids[pos], pos)
        results = []
        for e in batch.scheduled:
            if not e.sample:
                continue
            seq = e.seq
            context = [self.kv[self._slot(seq.block_ids, p)] for p in range(seq.num_tokens)]
            expected = [(t, p) for p, t in enumerate(seq.token_ids)]
            if context != expected:
                raise KVMismatch(f"{seq.request_id}: KV cache does not hold its context")
            results.append(
                self._sample(seq.request_id, seq.token_ids, seq.num_output_tokens, seq.sampling)
            )
        return results

    def _sample(
        self, rid: str, tokens: list[int], num_out: int, sp: SamplingParams
    ) -> SampleResult:
        script = self.script.get(rid)
        if script is not None and num_out < len(script):
            token = script[num_out]
        else:
            h = 0
            for t in tokens:
                h = (h * 1_000_003 + t) % 2_147_483_647
            token = 1 + h % (VOCAB - 1)  # never EOS
        logprobs = None
        if sp.logprobs is not None:
            top = tuple(TokenLogprob(token + i, -0.5 - i) for i in range(sp.logprobs))
            logprobs = PositionLogprobs(TokenLogprob(token, -0.5), top)
        return SampleResult(token, logprobs)


def make_engine(
    num_blocks: int = 64,
    max_model_len: int = 128,
    script: dict[str, list[int]] | None = None,
    **settings: object,
) -> LLMEngine:
    settings.setdefault("max_num_batched_tokens", 32)
    settings.setdefault("max_num_seqs", 8)
    return LLMEngine(
        FakeExecutor(num_blocks, BS, script),
        model="fake",
        vocab_size=VOCAB,
        eos_token_ids=(EOS,),
        max_model_len=max_model_len,
        num_kv_blocks=num_blocks,
        block_size=BS,
        settings=EngineSettings(block_size=BS, **settings),
    )


def request(rid: str, prompt: list[int], **sampling: object) -> AddRequest:
    sp = SamplingParams(**{"max_tokens": 8, **sampling})  # type: ignore[arg-type]
    return AddRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=sp, arrival_time=0.0)


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def prompts(n: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, VOCAB) for _ in range(shared)]
    return [
        prefix + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(n)
    ]


def test_implements_the_backend_protocol() -> None:
    engine: EngineBackend = make_engine()
    assert engine.supported_tasks == ("generate",)
    assert engine.num_kv_blocks == 64
    assert engine.block_size == BS


@pytest.mark.parametrize(
    ("prompt", "sampling", "match"),
    [
        ([], {}, "empty"),
        (list(range(1, 129)), {}, "maximum context length"),
        ([1, VOCAB], {}, "vocabulary"),
        ([1, -1], {}, "vocabulary"),
        ([1], {"max_tokens": 0}, "max_tokens"),
        ([1], {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ([1], {"logprobs": -1}, "logprobs"),
    ],
)
def test_add_request_refuses_bad_input(
    prompt: list[int], sampling: dict[str, object], match: str
) -> None:
    engine = make_engine(max_model_len=128)
    with pytest.raises(InvalidRequest, match=match):
        engine.add_request(request("r", prompt, **sampling))
    assert not engine.has_work()


def test_duplicate_request_id_is_refused() -> None:
    engine = make_engine()
    engine.add_request(request("r", [1, 2]))
    with pytest.raises(InvalidRequest, match="already"):
        engine.add_request(request("r", [1, 2]))


def test_outputs_are_deltas_with_logprobs() -> None:
    engine = make_engine()
    engine.add_request(request("r", [5, 6, 7], max_tokens=5, logprobs=2))
    outs = run_all(engine)["r"]
    assert [len(o.new_token_ids) for o in outs] == [1] * 5
    assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
    assert all(o.num_prompt_tokens == 3 for o in outs)
    logprobs = [lp for o in outs for lp in o.new_logprobs or ()]
    assert [lp.sampled.token_id for lp in logprobs] == tokens_of(outs)
    assert all(len(lp.top) == 2 for lp in logprobs)
    assert not engine.has_work()
    assert engine.block_manager.usage == 0.0


def test_no_logprobs_unless_asked() -> None:
    engine = make_engine()
    engine.add_request(request("r", [5, 6, 7], max_tokens=2))
    assert all(o.new_logprobs is None for o in run_all(engine)["r"])


def test_prefix_hit_for_identical_prompt() -> None:
    engine = make_engine(max_num_batched_tokens=64)
    prompt = list(range(1, 23))  # 5 full blocks + 2 tokens
    engine.add_request(request("a", prompt))
    a_first = engine.step()  # a is prefilled and its full blocks registered
    engine.add_request(request("b", prompt))
    second = engine.step()
    b_first = next(o for o in second if o.request_id == "b")
    assert a_first[0].num_cached_tokens == 0
    assert b_first.num_cached_tokens == 20
    a_seq, b_seq = engine._requests["a"], engine._requests["b"]
    assert b_seq.block_ids[:5] == a_seq.block_ids[:5]
    assert b_seq.block_ids[5] != a_seq.block_ids[5]
    outs = run_all(engine)
    a_outs = a_first + [o for o in second if o.request_id == "a"] + outs["a"]
    assert tokens_of([b_first, *outs["b"]]) == tokens_of(a_outs)
    stats = engine.stats()
    assert stats.prefix_cache_queries == 2 * len(prompt)
    assert stats.prefix_cache_hits == 20


def test_prefix_hit_after_the_first_request_finished() -> None:
    engine = make_engine()
    prompt = list(range(1, 23))
    engine.add_request(request("a", prompt))
    a = run_all(engine)["a"]
    engine.add_request(request("b", prompt))
    b = run_all(engine)["b"]
    assert a[0].num_cached_tokens == 0
    assert b[0].num_cached_tokens > 0
    assert tokens_of(a) == tokens_of(b)


def test_different_prefixes_do_not_hit() -> None:
    engine = make_engine()
    engine.add_request(request("a", list(range(1, 23))))
    run_all(engine)
    engine.add_request(request("b", list(range(2, 24))))
    assert run_all(engine)["b"][0].num_cached_tokens == 0


def test_chunked_prefill_respects_the_budget() -> None:
    engine = make_engine(max_num_batched_tokens=16, max_model_len=128)
    engine.add_request(request("long", list(range(1, 51)), max_tokens=3))
    engine.add_request(request("short", [1, 2, 3], max_tokens=3))
    run_all(engine)
    executor = engine.executor
    assert isinstance(executor, FakeExecutor)
    assert all(sum(n for _, _, n, _ in b) <= 16 for b in executor.batches)
    long_chunks = [n for b in executor.batches for rid, _, n, s in b if rid == "long" and n > 1]
    assert long_chunks == [16, 16, 16, 2]


def generate_all(engine: LLMEngine, ps: list[list[int]], **sampling: object) -> list[list[int]]:
    llm = LLM.from_engine(engine)
    sp = SamplingParams(**{"max_tokens": 12, **sampling})  # type: ignore[arg-type]
    results = llm.generate(ps, sp)
    assert all(r.finish_reason == "length" for r in results)
    return [r.token_ids for r in results]


def test_preemption_loses_no_request() -> None:
    ps = prompts(12, seed=1, shared=6)
    ample = make_engine(num_blocks=256, max_model_len=48)
    scarce = make_engine(num_blocks=12, max_model_len=48)  # room for one full-length sequence
    expected = generate_all(ample, ps)
    assert generate_all(scarce, ps) == expected
    assert scarce.stats().num_preemptions > 0
    assert ample.stats().num_preemptions == 0
    assert scarce.block_manager.usage == 0.0


def test_prefix_caching_does_not_change_outputs() -> None:
    ps = prompts(10, seed=2, shared=9) * 2
    on = make_engine(num_blocks=24, enable_prefix_caching=True)
    off = make_engine(num_blocks=24, enable_prefix_caching=False)
    assert generate_all(on, ps) == generate_all(off, ps)
    assert on.stats().prefix_cache_hits > 0
    assert off.stats().prefix_cache_hits == 0


def test_abort_frees_blocks_and_reports_abort() -> None:
    engine = make_engine()
    engine.add_request(request("a", list(range(1, 20)), max_tokens=50))
    engine.add_request(request("b", list(range(1, 10)), max_tokens=50))
    engine.add_request(request("c", list(range(1, 5)), max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.usage > 0
    outs = engine.abort_requests(["a", "unknown", "b"])
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort"), ("b", "abort")]
    assert engine.abort_requests(["a"]) == []
    rest = run_all(engine)
    assert set(rest) == {"c"}
    assert engine.block_manager.usage == 0.0
    assert not engine.has_work()


def test_abort_of_a_waiting_request() -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add_request(request("a", [1, 2, 3]))
    engine.add_request(request("b", [1, 2, 3]))
    engine.step()
    (out,) = engine.abort_requests(["b"])
    assert out.finish_reason == "abort"
    assert out.new_token_ids == ()
    assert set(run_all(engine)) == {"a"}


@pytest.mark.parametrize(
    ("sampling", "script", "reason", "stop_id", "num_out"),
    [
        pytest.param({}, [5, EOS, 5], "stop", None, 2, id="eos"),
        pytest.param(
            {"ignore_eos": True, "max_tokens": 3}, [5, EOS, 5], "length", None, 3, id="ignore_eos"
        ),
        pytest.param({"min_tokens": 3}, [EOS, EOS, EOS, EOS], "stop", None, 3, id="min_tokens"),
        pytest.param({"stop_token_ids": (7, 9)}, [5, 9, 5], "stop", 9, 2, id="stop_token_ids"),
        pytest.param({"max_tokens": 4}, [], "length", None, 4, id="max_tokens"),
    ],
)
def test_stop_conditions(
    sampling: dict[str, object], script: list[int], reason: str, stop_id: int | None, num_out: int
) -> None:
    engine = make_engine(script={"r": script})
    engine.add_request(request("r", [3, 4, 5], **sampling))
    outs = run_all(engine)["r"]
    assert outs[-1].finish_reason == reason
    assert outs[-1].stop_token_id == stop_id
    assert len(tokens_of(outs)) == num_out
    assert engine.block_manager.usage == 0.0


def test_max_model_len_stops_with_length() -> None:
    engine = make_engine(max_model_len=20)
    engine.add_request(request("r", list(range(1, 16)), max_tokens=100))
    outs = run_all(engine)["r"]
    assert outs[-1].finish_reason == "length"
    assert len(tokens_of(outs)) == 5


def test_too_big_sequence_fails_alone() -> None:
    # the engine constructor does not check capacity; from_settings does
    engine = make_engine(num_blocks=4, max_model_len=64)
    engine.add_request(request("ok1", [1, 2, 3], max_tokens=4))
    engine.add_request(request("big", list(range(1, 21)), max_tokens=4))  # 5 blocks > 4
    engine.add_request(request("ok2", [4, 5, 6], max_tokens=4))
    outs = run_all(engine)
    assert outs["big"][-1].finish_reason == "error"
    assert "KV cache" in (outs["big"][-1].error or "")
    assert outs["ok1"][-1].finish_reason == outs["ok2"][-1].finish_reason == "length"
    assert len(tokens_of(outs["ok1"])) == len(tokens_of(outs["ok2"])) == 4
    assert not engine.has_work()


def test_stats_counters() -> None:
    engine = make_engine(max_num_seqs=2)
    assert engine.stats().num_steps == 0
    for i in range(3):
        engine.add_request(request(f"r{i}", list(range(1, 10)), max_tokens=3))
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running) == (3, 0)
    engine.step()
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running) == (1, 2)
    assert stats.kv_cache_usage == pytest.approx(6 / 64)
    assert stats.prefix_cache_queries == 18
    assert stats.prefix_cache_hits == 0  # r0's blocks are registered only once computed
    assert stats.num_steps == 1
    run_all(engine)
    stats = engine.stats()
    assert (stats.num_waiting, stats.num_running, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.num_steps == 6
    assert stats.prefix_cache_queries == 27
    assert stats.prefix_cache_hits == 8  # r2 reuses two full blocks of r0 or r1
    assert stats.num_preemptions == 0
    assert engine.reset_prefix_cache()
    assert engine.block_manager.num_cached_free_blocks == 0


def test_reset_prefix_cache_while_running_keeps_outputs_correct() -> None:
    ps = prompts(6, seed=3, shared=8)
    expected = generate_all(make_engine(), ps)
    engine = make_engine()
    llm = LLM.from_engine(engine)
    sp = SamplingParams(max_tokens=12)
    for i, p in enumerate(ps):
        engine.add_request(request(f"x{i}", p, max_tokens=12))
    outs: dict[str, list[RequestOutput]] = {}
    for n in range(10_000):
        if not engine.has_work():
            break
        if n in (1, 3):
            assert engine.reset_prefix_cache()
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert [tokens_of(outs[f"x{i}"]) for i in range(len(ps))] == expected
    assert [r.token_ids for r in llm.generate(ps, sp)] == expected


def test_step_without_work_does_nothing() -> None:
    engine = make_engine()
    assert engine.step() == []
    assert engine.stats().num_steps == 0


def test_random_workload_with_aborts_keeps_blocks_consistent() -> None:
    rng = random.Random(7)
    engine = make_engine(num_blocks=16, max_model_len=60, max_num_batched_tokens=16)
    live: set[str] = set()
    for i in range(60):
        if rng.random() < 0.6:
            rid = f"r{i}"
            prompt = prompts(1, seed=i, shared=rng.choice([0, 8]))[0][:50]
            engine.add_request(request(rid, prompt, max_tokens=rng.randrange(1, 12)))
            live.add(rid)
        if live and rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            engine.abort_requests([victim])
            live.discard(victim)
        for out in engine.step():
            if out.finish_reason is not None:
                live.discard(out.request_id)
        check_ref_counts(engine)
    run_all(engine)
    check_ref_counts(engine)
    assert engine.block_manager.usage == 0.0


def check_ref_counts(engine: LLMEngine) -> None:
    bm = engine.block_manager
    counts = [0] * bm.num_blocks
    for seq in engine.scheduler.running:
        for b in seq.block_ids:
            counts[b] += 1
    assert all(not s.block_ids for s in engine.scheduler.waiting)
    assert counts == [bm.ref_count(b) for b in range(bm.num_blocks)]
    assert bm.num_free_blocks == counts.count(0)


def test_llm_generate_returns_results_in_prompt_order() -> None:
    engine = make_engine(script={"llm-1": [EOS]})
    llm = LLM.from_engine(engine)
    seen: list[tuple[int, int]] = []
    ps = [[1, 2, 3], [4, 5], [6] * 30]
    params = [
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=5),
        SamplingParams(max_tokens=1, logprobs=0),
    ]
    results = llm.generate(ps, params, progress=lambda done, total: seen.append((done, total)))
    assert [len(r.token_ids) for r in results] == [3, 1, 1]
    assert [r.finish_reason for r in results] == ["length", "stop", "length"]
    assert results[2].logprobs is not None and len(results[2].logprobs) == 1
    assert results[0].logprobs is None
    assert [r.num_prompt_tokens for r in results] == [3, 2, 30]
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_llm_generate_refuses_mismatched_sampling_list() -> None:
    llm = LLM.from_engine(make_engine())
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[1], [2]], [SamplingParams(max_tokens=1)])


def test_llm_generate_leaves_nothing_behind_on_invalid_prompt() -> None:
    engine = make_engine()
    llm = LLM.from_engine(engine)
    with pytest.raises(InvalidRequest):
        llm.generate([[1, 2], []], SamplingParams(max_tokens=2))
    assert not engine.has_work()


# ---- from_settings, with the torch modules replaced by fakes --------------------------------


class _FakeConfig:
    architecture = "LlamaForCausalLM"
    vocab_size = VOCAB
    max_position_embeddings = 256
    eos_token_ids = (EOS, 3)

    @classmethod
    def from_dir(cls, path: Path) -> _FakeConfig:
        return cls()


def _install_fakes(monkeypatch: pytest.MonkeyPatch, num_kv_blocks: int) -> None:
    class FakeRunner(FakeExecutor):
        def __init__(self, config: _FakeConfig, settings: EngineSettings) -> None:
            super().__init__(num_kv_blocks, settings.block_size)
            self.num_kv_blocks = num_kv_blocks
            self.device = "cpu"
            self.dtype = "float32"

    modules: dict[str, dict[str, object]] = {
        "kubellm.engine.model_files": {
            "resolve_model": lambda model: Path("/models") / (model or "default")
        },
        "kubellm.engine.config": {"ModelConfig": _FakeConfig},
        "kubellm.engine.model_runner": {"ModelRunner": FakeRunner},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)


def test_from_settings_composes_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fakes(monkeypatch, num_kv_blocks=64)
    llm = LLM("m", block_size=BS)
    engine = llm.engine
    assert engine.model == str(Path("/models/m"))
    assert engine.max_model_len == 256
    assert engine.eos_token_ids == (EOS, 3)
    assert (engine.num_kv_blocks, engine.block_size, engine.device) == (64, BS, "cpu")
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_from_settings_refuses_a_kv_cache_smaller_than_one_sequence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _install_fakes(monkeypatch, num_kv_blocks=10)
    with pytest.raises(ValueError, match="--max-model-len"):
        LLMEngine.from_settings(EngineSettings(block_size=BS))
    engine = LLMEngine.from_settings(EngineSettings(block_size=BS, max_model_len=40))
    assert engine.max_model_len == 40
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLMEngine.from_settings(EngineSettings(block_size=BS, max_model_len=512))
