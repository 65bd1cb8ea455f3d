"""`DummyEngine`: a torch-free backend with scripted tokens and faults.

It runs no model. Each step emits one token per running request, chosen by a deterministic
function of the prompt and the position (`dummy_token`), so tests can predict the output and
front-end benchmarks see thousands of tokens per second. Faults come from
`EngineSettings.dummy_behaviour`, e.g. "token_delay_s=0.01,crash_after_tokens=5".
"""

from __future__ import annotations

import logging
import os
import signal
import time
import zlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields

from kubellm.engine.backend import InvalidRequest
from kubellm.protocol.messages import (
    AddRequest,
    FinishReason,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    TokenLogprob,
)
from kubellm.protocol.settings import EngineSettings

logger = logging.getLogger(__name__)

DUMMY_VOCAB_SIZE = 32000
DUMMY_EOS_TOKEN_ID = 2
_FIRST_TOKEN = 3
"""Generated ids lie in [3, vocab): never EOS, so only max_tokens and stop ids end requests."""


def _prompt_seed(prompt_token_ids: Seq[int]) -> int:
    data = b"".join(t.to_bytes(4, "little", signed=True) for t in prompt_token_ids)
    return zlib.crc32(data)


def dummy_token(prompt_token_ids: Seq[int], position: int) -> int:
    """The token the dummy engine generates at sequence `position` after this prompt."""
    return _token_at(_prompt_seed(prompt_token_ids), position)


def _token_at(seed: int, position: int) -> int:
    mixed = (seed * 2654435761 + (position + 1) * 40503) % (2**32)
    return _FIRST_TOKEN + mixed % (DUMMY_VOCAB_SIZE - _FIRST_TOKEN)


@dataclass(frozen=True)
class DummyBehaviour:
    """Parsed `dummy_behaviour`: comma-separated key=value pairs, all optional."""

    startup_delay_s: float = 0.0
    token_delay_s: float = 0.0
    crash_after_tokens: int | None = None
    raise_after_tokens: int | None = None
    hang_after_tokens: int | None = None
    fail_prefix: str | None = None
    startup_fail: bool = False

    @classmethod
    def parse(cls, text: str) -> DummyBehaviour:
        """Parse "key=value,key=value"; raises ValueError naming the bad item and valid keys."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for item in (p.strip() for p in text.split(",")):
            if not item:
                continue
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or key not in types:
                raise ValueError(
                    f"invalid dummy behaviour {item!r}: expected key=value with key one of "
                    f"{', '.join(sorted(types))}"
                )
            values[key] = _parse_value(key, str(types[key]), raw)
        return cls(**values)  # type: ignore[arg-type]


def _parse_value(key: str, type_name: str, raw: str) -> object:
    try:
        if type_name == "float":
            number = float(raw)
            if not number >= 0:  # also rejects NaN
                raise ValueError("must be >= 0")
            value: object = number
        elif type_name == "int | None":
            value = count = int(raw)
            if count < 0:
                raise ValueError("must be >= 0")
        elif type_name == "bool":
            if raw not in ("0", "1", "true", "false"):
                raise ValueError("must be 0, 1, true or false")
            value = raw in ("1", "true")
        else:
            if not raw:
                raise ValueError("must not be empty")
            value = raw
    except ValueError as e:
        raise ValueError(f"invalid dummy behaviour {key}={raw!r}: {e}") from None
    return value


@dataclass(eq=False)
class _DummyRequest:
    request_id: str
    num_prompt_tokens: int
    seed: int
    sampling: SamplingParams
    output: list[int] = field(default_factory=list)


class DummyEngine:
    """Implements `kubellm.engine.backend.EngineBackend` without a model."""

    def __init__(self, settings: EngineSettings):
        self.behaviour = DummyBehaviour.parse(settings.dummy_behaviour)
        if self.behaviour.startup_fail:
            raise RuntimeError("dummy engine start-up failure (startup_fail=1)")
        self.model = settings.model or "dummy"
        self.max_model_len = settings.max_model_len or 2048
        self.max_num_seqs = settings.max_num_seqs
        self.block_size = settings.block_size
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.num_kv_blocks = settings.num_kv_blocks or self.max_num_seqs * blocks_per_seq
        self.vocab_size = DUMMY_VOCAB_SIZE
        self.eos_token_ids: tuple[int, ...] = (DUMMY_EOS_TOKEN_ID,)
        self.device = "cpu"
        self.dtype: str = "float32" if settings.dtype == "auto" else settings.dtype
        self.supported_tasks: tuple[str, ...] = ("generate",)
        self._waiting: dict[str, _DummyRequest] = {}
        self._running: dict[str, _DummyRequest] = {}
        self._failed: list[RequestOutput] = []
        self._total_tokens = 0
        self._num_steps = 0
        if self.behaviour.startup_delay_s:
            logger.info("dummy engine: start-up delay of %.1f s", self.behaviour.startup_delay_s)
            time.sleep(self.behaviour.startup_delay_s)

    def add_request(self, request: AddRequest) -> None:
        rid = request.request_id
        if rid in self._waiting or rid in self._running:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt of {len(request.prompt_token_ids)} tokens leaves no room to generate "
                f"within max_model_len={self.max_model_len}"
            )
        prefix = self.behaviour.fail_prefix
        if prefix is not None and rid.startswith(prefix):
            self._failed.append(
                RequestOutput(
                    request_id=rid,
                    new_token_ids=(),
                    finish_reason="error",
                    num_prompt_tokens=len(request.prompt_token_ids),
                    error=f"dummy failure for request ids starting with {prefix!r}",
                )
            )
            return
        self._waiting[rid] = _DummyRequest(
            request_id=rid,
            num_prompt_tokens=len(request.prompt_token_ids),
            seed=_prompt_seed(request.prompt_token_ids),
            sampling=request.sampling,
        )

    def abort_requests(self, request_ids: Seq[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            req = self._running.pop(rid, None) or self._waiting.pop(rid, None)
            if req is not None:
                outputs.append(
                    RequestOutput(request_id=rid, new_token_ids=(), finish_reason="abort")
                )
        return outputs

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._failed)

    def step(self) -> list[RequestOutput]:
        self._fault_check()
        if self.behaviour.token_delay_s:
            time.sleep(self.behaviour.token_delay_s)
        self._admit()
        outputs, self._failed = self._failed, []
        for req in list(self._running.values()):
            outputs.append(self._advance(req))
        self._num_steps += 1
        return outputs

    def stats(self) -> SchedulerStats:
        used = len(self._running) / self.max_num_seqs
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_cache_usage=used,
            num_steps=self._num_steps,
        )

    def reset_prefix_cache(self) -> bool:
        return True

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            rid = next(iter(self._waiting))
            self._running[rid] = self._waiting.pop(rid)

    def _fault_check(self) -> None:
        b, total = self.behaviour, self._total_tokens
        if b.crash_after_tokens is not None and total >= b.crash_after_tokens:
            logger.warning("dummy engine: crash_after_tokens=%d reached, SIGKILL", total)
            os.kill(os.getpid(), signal.SIGKILL)
        if b.raise_after_tokens is not None and total >= b.raise_after_tokens:
            raise RuntimeError(f"dummy engine failure: raise_after_tokens={b.raise_after_tokens}")
        if b.hang_after_tokens is not None and total >= b.hang_after_tokens:
            logger.warning("dummy engine: hang_after_tokens=%d reached, hanging", total)
            while True:
                time.sleep(3600)

    def _advance(self, req: _DummyRequest) -> RequestOutput:
        """Generate one token for `req`; finish and drop it when a stop condition holds."""
        sp = req.sampling
        position = req.num_prompt_tokens + len(req.output)
        token = _token_at(req.seed, position)
        if len(req.output) < sp.min_tokens:
            while token in sp.stop_token_ids:  # suppressed before min_tokens, as in sampling
                token = _FIRST_TOKEN + (token + 1 - _FIRST_TOKEN) % (
                    DUMMY_VOCAB_SIZE - _FIRST_TOKEN
                )
        req.output.append(token)
        self._total_tokens += 1
        finish: FinishReason | None = None
        stop_id: int | None = None
        if token in sp.stop_token_ids:
            finish, stop_id = "stop", token
        elif len(req.output) >= sp.max_tokens or position + 1 >= self.max_model_len:
            finish = "length"
        if finish is not None:
            del self._running[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=(token,),
            new_logprobs=None if sp.logprobs is None else (_fake_logprobs(token, sp.logprobs),),
            finish_reason=finish,
            stop_token_id=stop_id,
            num_prompt_tokens=req.num_prompt_tokens,
        )


def _fake_logprobs(token: int, k: int) -> PositionLogprobs:
    """Well-formed logprobs: the sampled token is the most likely; alternatives decrease."""
    sampled = TokenLogprob(token_id=token, logprob=-0.25)
    alternatives = [
        TokenLogprob(
            token_id=_FIRST_TOKEN + (token + i) % (DUMMY_VOCAB_SIZE - _FIRST_TOKEN),
            logprob=-1.0 - i,
        )
        for i in range(1, k)
    ]
    top = (sampled, *alternatives) if k > 0 else ()
    return PositionLogprobs(sampled=sampled, top=top)
