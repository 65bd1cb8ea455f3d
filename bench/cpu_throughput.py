"""CPU throughput: kubellm's engine against transformers `generate`, same checkpoint and workload.

Prints one JSON line per measurement, a greedy-agreement check per batch size, and a final
summary line with the ratio ours/theirs per batch size. See bench/README.md.

    .venv/bin/python bench/cpu_throughput.py --batch-sizes 1,8,16 --num-requests 32
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.cpu_throughput")

# A fixed English text; prompts are windows cut from its tokens at random offsets.
TEXT = """\
The river began in the high meadows, where snow lingered in the shadows of the rocks until
late June. From there it fell through a narrow gorge, gathering the water of a hundred small
streams, and by the time it reached the first village it was wide enough to turn a mill wheel.
The miller's family had worked the same stones for four generations. They knew the river's
moods: the brown spring floods that carried whole trees past the window, the lazy green of
August, the thin black ice of January that sang when you walked on it. Travellers who stopped
at the inn across the bridge often asked the old miller how long the wheel had turned. He would
shrug and say that the wheel was younger than the river, and the river was younger than the
mountains, and the mountains were younger than the questions people asked about them.
Below the village the valley opened into farmland. Orchards of apples and pears climbed the
southern slopes, and the northern side, which saw less sun, was given to pasture. In autumn the
farmers brought their fruit to the market town at the valley's mouth, where the river slowed and
widened before meeting the sea. Merchants came from the coast with salt, cloth and news, and
left with cider, cheese and wool. The town kept records of every sale in thick ledgers bound in
leather, and a curious reader could follow a single family's fortunes across two hundred years:
a good harvest here, a fire there, a daughter's wedding paid for in barrels of honey.
Scientists who study rivers say that every one of them is both a path and a process. Water moves
downhill, but it also carves, sorts and carries; it builds deltas and digs canyons; it connects
places that would otherwise have nothing to do with each other. The people who live beside a
river learn, sooner or later, that they are part of that process too.
"""


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


@dataclass(frozen=True)
class Measurement:
    tokens: list[list[int]]
    elapsed_s: float
    cached_prompt_tokens: int | None = None
    """Prompt tokens served from kubellm's prefix cache (None for transformers)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: embedded SmolLM2)")
    parser.add_argument("--batch-sizes", default="1,8,16", help="comma-separated, e.g. 1,8,16")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", default="32,128", help="min,max prompt tokens")
    parser.add_argument("--max-tokens", default="16,128", help="min,max output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--engines",
        default="kubellm,transformers",
        help="which to run (comma-separated); the ratio needs both",
    )
    args = parser.parse_args(argv)
    args.batch_sizes = _int_list(parser, "--batch-sizes", args.batch_sizes)
    args.prompt_len = _int_range(parser, "--prompt-len", args.prompt_len)
    args.max_tokens = _int_range(parser, "--max-tokens", args.max_tokens)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - {"kubellm", "transformers"}
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from kubellm, transformers")
    if args.num_requests < 1 or args.threads < 1:
        parser.error("--num-requests and --threads must be >= 1")
    return args


def _int_list(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag}: expected positive integers, got {text!r}")
    return values


def _int_range(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, int]:
    values = _int_list(parser, flag, text)
    low, high = (values[0], values[0]) if len(values) == 1 else (values[0], values[1])
    if len(values) > 2 or low > high:
        parser.error(f"{flag}: expected MIN,MAX with MIN <= MAX, got {text!r}")
    return low, high


def make_workload(
    text_ids: list[int], n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int
) -> Workload:
    """Seeded prompts (windows of `text_ids`) and output lengths, both uniform in their range."""
    rng = random.Random(seed)
    if len(text_ids) < prompt_len[1]:
        raise SystemExit(f"the text has {len(text_ids)} tokens, fewer than --prompt-len max")
    prompts, outputs = [], []
    for _ in range(n):
        length = rng.randint(*prompt_len)
        start = rng.randint(0, len(text_ids) - length)
        prompts.append(text_ids[start : start + length])
        outputs.append(rng.randint(*max_tokens))
    return Workload(prompts, outputs)


def text_token_ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids: list[int] = tokenizer.encode(TEXT).ids
    return ids


def run_kubellm(model_dir: Path, batch: int, work: Workload, warmup: Workload) -> Measurement:
    """Our engine, max_num_seqs=batch (continuous batching), greedy with ignore_eos."""
    from kubellm.engine.llm import LLM
    from kubellm.protocol.messages import SamplingParams

    longest = max(len(p) + m for p, m in zip(work.prompts, work.max_tokens, strict=True))
    llm = LLM(
        model=str(model_dir),
        max_num_seqs=batch,
        device="cpu",
        dtype="float32",
        max_model_len=max(256, longest),
        kv_cache_memory_gib=0.5,  # ~11k tokens for SmolLM2: plenty for this workload
    )

    def params(w: Workload) -> list[SamplingParams]:
        return [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in w.max_tokens
        ]

    llm.generate(warmup.prompts, params(warmup))
    started = time.perf_counter()
    results = llm.generate(work.prompts, params(work))
    elapsed = time.perf_counter() - started
    tokens = [list(r.token_ids) for r in results]
    _check_lengths("kubellm", tokens, work)
    cached = sum(r.num_cached_tokens for r in results)
    del llm, results
    gc.collect()  # free this engine's KV cache before the next batch size builds its own
    return Measurement(tokens, elapsed, cached)


def load_transformers(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Like ignore_eos: generate() would otherwise fill a missing eos_token_id from here and stop
    # (min_new_tokens would instead mask EOS, which changes the greedy tokens).
    model.generation_config.eos_token_id = None
    return model.eval()


def run_transformers(model: Any, batch: int, work: Workload, warmup: Workload) -> Measurement:
    """Static batches of `batch` requests, left-padded, each run to its longest output."""
    _hf_generate_all(model, batch, warmup)
    started = time.perf_counter()
    tokens = _hf_generate_all(model, batch, work)
    elapsed = time.perf_counter() - started
    _check_lengths("transformers", tokens, work)
    return Measurement(tokens, elapsed)


def _hf_generate_all(model: Any, batch: int, work: Workload) -> list[list[int]]:
    out: list[list[int]] = []
    for first in range(0, len(work.prompts), batch):
        prompts = work.prompts[first : first + batch]
        wanted = work.max_tokens[first : first + batch]
        generated = _hf_generate(model, prompts, max(wanted))
        out.extend(g[:m] for g, m in zip(generated, wanted, strict=True))  # useful tokens only
    return out


def _hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import GenerationConfig

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,  # see load_transformers
        pad_token_id=pad,
    )
    with torch.inference_mode():
        result = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [row[width:].tolist() for row in result]


def _check_lengths(engine: str, tokens: list[list[int]], work: Workload) -> None:
    got = [len(t) for t in tokens]
    if got != work.max_tokens:
        raise SystemExit(f"{engine} produced {got} tokens, expected {work.max_tokens}")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def measurement_record(
    engine: str, batch: int, work: Workload, m: Measurement, threads: int
) -> dict[str, Any]:
    return {
        "engine": engine,
        "batch_size": batch,
        "num_requests": len(work.prompts),
        "prompt_tokens": sum(len(p) for p in work.prompts),
        "output_tokens": work.output_tokens,
        "elapsed_s": round(m.elapsed_s, 3),
        "output_tokens_per_s": round(work.output_tokens / m.elapsed_s, 2),
        "threads": threads,
        **(
            {}
            if m.cached_prompt_tokens is None
            else {"cached_prompt_tokens": m.cached_prompt_tokens}
        ),
    }


def greedy_check(batch: int, ours: Measurement, theirs: Measurement) -> dict[str, Any]:
    """Informative, not a gate: float32 on both sides, but different kernels and batching."""
    a, b = ours.tokens[0], theirs.tokens[0]
    mismatch = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    return {
        "check": "greedy_tokens_first_request",
        "batch_size": batch,
        "match": mismatch is None,
        "first_mismatch_at": mismatch,
        "tokens_compared": len(a),
        "requests_identical": sum(x == y for x, y in zip(ours.tokens, theirs.tokens, strict=True)),
        "num_requests": len(ours.tokens),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch

    from kubellm.engine.model_files import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    text_ids = text_token_ids(model_dir)
    work = make_workload(text_ids, args.num_requests, args.prompt_len, args.max_tokens, args.seed)
    warm = make_workload(text_ids, 2, (16, 32), (8, 8), args.seed + 1)
    hf_model = load_transformers(model_dir) if "transformers" in args.engines else None
    ratios: dict[str, float] = {}
    for batch in args.batch_sizes:
        results: dict[str, Measurement] = {}
        if hf_model is not None:
            results["transformers"] = run_transformers(hf_model, batch, work, warm)
        if "kubellm" in args.engines:
            results["kubellm"] = run_kubellm(model_dir, batch, work, warm)
        for engine, measured in results.items():
            emit(measurement_record(engine, batch, work, measured, args.threads))
        if len(results) == 2:
            emit(greedy_check(batch, results["kubellm"], results["transformers"]))
            theirs, ours = results["transformers"].elapsed_s, results["kubellm"].elapsed_s
            ratios[str(batch)] = round(theirs / ours, 3)  # same tokens: ours/theirs tok/s
    emit(
        {
            "summary": "output tokens/s ratio kubellm/transformers per batch size",
            "ratio": ratios,
            "model": str(model_dir),
            "threads": args.threads,
            "torch": torch.__version__,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
