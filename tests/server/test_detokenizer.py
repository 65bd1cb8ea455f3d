"""Incremental detokenization: UTF-8 safety, stop strings, hold-back, min_tokens, windowing."""

from __future__ import annotations

from collections.abc import Sequence

from kubellm.server.detokenizer import IncrementalDetokenizer

SPECIAL = 0


class ByteTokenizer:
    """Token i (1..256) is byte i-1; token 0 is a special token "<s>". Records window sizes."""

    def __init__(self) -> None:
        self.window_sizes: list[int] = []

    @staticmethod
    def encode(text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        out = b""
        for i in ids:
            if i == SPECIAL:
                out += b"" if skip_special_tokens else b"<s>"
            else:
                out += bytes([i - 1])
        return out.decode("utf-8", errors="replace")


class PieceTokenizer:
    """Tokens are whole strings, for tests about token boundaries."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def run(detok: IncrementalDetokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    deltas = [detok.push(chunk) for chunk in ids]
    deltas.append(detok.flush())
    return deltas


def test_multibyte_characters_are_never_split() -> None:
    text = "é漢🙂 a-é-漢-🙂!"
    tok = ByteTokenizer()
    deltas = run(IncrementalDetokenizer(tok), [[t] for t in tok.encode(text)])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # held back while incomplete: the 4-byte emoji appears in one delta, whole
    assert "🙂" in deltas


def test_window_stays_small() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("abcdefgh" * 200 + "漢" * 100)
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("prompt"))
    out = "".join(run(detok, [[t] for t in ids]))
    assert out == "abcdefgh" * 200 + "漢" * 100
    assert max(tok.window_sizes) <= 12


def test_prompt_context_is_not_emitted() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("the prompt"))
    assert "".join(run(detok, [tok.encode("out")])) == "out"


def test_special_tokens_skipped_or_kept() -> None:
    tok = ByteTokenizer()
    ids = [[SPECIAL], tok.encode("hi"), [SPECIAL]]
    assert "".join(run(IncrementalDetokenizer(tok), ids)) == "hi"
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(run(kept, ids)) == "<s>hi<s>"


def test_stop_string_across_tokens() -> None:
    pieces = ["Hel", "lo w", "orld", " and", " more"]
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), stop=["o wor"])
    deltas = [detok.push([i]) for i in range(3)]
    assert "".join(deltas) == "Hell"
    assert detok.stopped and detok.stop_reason == "o wor"
    assert detok.push([3]) == "" and detok.flush() == ""


def test_stop_string_included_in_output() -> None:
    pieces = ["Hel", "lo w", "orld!", " more"]
    detok = IncrementalDetokenizer(
        PieceTokenizer(pieces), stop=["o wor"], include_stop_str_in_output=True
    )
    assert "".join(detok.push([i]) for i in range(4)) == "Hello wor"
    assert detok.stop_reason == "o wor"


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    pieces = ["abc S", "T", "x", "y S"]
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), stop=["STOP"])
    assert detok.push([0]) == "abc "
    assert detok.push([1]) == ""  # "ST" could still become "STOP"
    assert detok.push([2]) == "STx"
    assert detok.push([3]) == "y "
    assert detok.flush() == "S"
    assert not detok.stopped


def test_earliest_stop_string_wins() -> None:
    detok = IncrementalDetokenizer(PieceTokenizer(["one two three"]), stop=["three", "two"])
    assert detok.push([0]) == "one "
    assert detok.stop_reason == "two"


def test_stop_strings_not_checked_before_min_tokens() -> None:
    pieces = ["a", "STOP", "b", "STOP", "c"]
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), stop=["STOP"], min_tokens=3)
    out = "".join(detok.push([i]) for i in range(5))
    assert out == "aSTOPb"
    assert detok.stop_reason == "STOP" and detok.num_generated == 4


def test_incomplete_utf8_at_the_end_is_flushed() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("ok")) == "ok"
    assert detok.push([0xE6 + 1]) == ""  # first byte of a 3-byte character
    assert detok.flush() == "\ufffd"
