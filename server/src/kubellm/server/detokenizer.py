"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of recent tokens (a prefix offset and a read offset, as in
Hugging Face's TextStreamer and vLLM), so each step costs O(window), not O(output). A decoded
tail ending in U+FFFD is an incomplete UTF-8 character: it is held back until the next tokens
complete it. Stop strings are matched across token boundaries; any tail that could still grow
into a stop string is held back until it is disambiguated, so text once emitted is never taken
back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
INITIAL_WINDOW = 5
"""Prompt tokens seeded into the window, so the first output token decodes in context (e.g. a
SentencePiece leading space is kept)."""


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_WINDOW:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_generated = 0
        self.text = ""
        """All text decoded so far (truncated at the stop string once stopped)."""
        self._emitted = 0
        """Characters of `text` already returned."""
        self.stop_reason: str | None = None
        """The stop string that matched, if any."""

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def num_generated(self) -> int:
        return self._num_generated

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text that is now safe to emit."""
        if self.stopped or not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        self._num_generated += len(new_token_ids)
        prev_len = len(self.text)
        self.text += self._decode_window(final=False)
        return self._release(prev_len, final=False)

    def flush(self) -> str:
        """At the end of generation: decode what is pending and release all held-back text."""
        if self.stopped:
            return ""
        prev_len = len(self.text)
        self.text += self._decode_window(final=True)
        return self._release(prev_len, final=True)

    def _decode_window(self, final: bool) -> str:
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _release(self, prev_len: int, final: bool) -> str:
        if self._stop and self._num_generated >= self._min_tokens:
            self._check_stop(prev_len)
        end = len(self.text)
        if not self.stopped and not final and not self._include_stop:
            end -= self._partial_stop_len()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _check_stop(self, prev_len: int) -> None:
        """Find the earliest stop string that ends in the text added since `prev_len`."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, max(prev_len - len(s) + 1, 0))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return
        index, s = best
        self.text = self.text[: index + len(s)] if self._include_stop else self.text[:index]
        self.stop_reason = s

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
