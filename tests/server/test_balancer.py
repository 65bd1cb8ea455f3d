"""The balancer: least loaded engine first, ties by KV usage, then in rotation."""

from __future__ import annotations

import pytest

from kubellm.server.balancer import Balancer, EngineLoad


def _idle(*ranks: int) -> list[EngineLoad]:
    return [EngineLoad(rank=r) for r in ranks]


def test_score_weighs_waiting_four_times_running() -> None:
    assert EngineLoad(rank=0, waiting=2, running=3, sent_since_stats=1).score == 12
    balancer = Balancer(size=2)
    # 1 waiting (4) is worse than 3 running (3).
    loads = [EngineLoad(rank=0, waiting=1), EngineLoad(rank=1, running=3)]
    assert balancer.pick(loads) == 1


def test_requests_sent_since_the_last_report_count() -> None:
    balancer = Balancer(size=2)
    loads = [EngineLoad(rank=0, running=1), EngineLoad(rank=1, sent_since_stats=2)]
    assert balancer.pick(loads) == 0


def test_ties_go_to_the_lower_kv_cache_usage() -> None:
    balancer = Balancer(size=3)
    loads = [
        EngineLoad(rank=0, running=2, kv_cache_usage=0.5),
        EngineLoad(rank=1, running=2, kv_cache_usage=0.2),
        EngineLoad(rank=2, running=2, kv_cache_usage=0.7),
    ]
    assert balancer.pick(loads) == 1


@pytest.mark.parametrize(("client_index", "expected"), [(0, [0, 1, 2, 0]), (1, [1, 2, 0, 1])])
def test_equal_engines_take_turns_starting_at_the_client_index(
    client_index: int, expected: list[int]
) -> None:
    balancer = Balancer(client_index=client_index, size=3)
    assert [balancer.pick(_idle(0, 1, 2)) for _ in range(4)] == expected


def test_client_index_beyond_the_size_wraps() -> None:
    assert Balancer(client_index=5, size=2).pick(_idle(0, 1)) == 1


def test_rotation_skips_ranks_that_are_not_candidates() -> None:
    balancer = Balancer(client_index=1, size=3)
    assert balancer.pick(_idle(0, 2)) == 2
    assert balancer.pick(_idle(0, 2)) == 0
    assert balancer.pick(_idle(0, 2)) == 2


def test_a_rank_beyond_the_size_is_still_balanced() -> None:
    balancer = Balancer(size=1)
    assert sorted(balancer.pick(_idle(0, 3)) or 0 for _ in range(2)) == [0, 3]


def test_no_candidates_gives_none() -> None:
    assert Balancer(size=2).pick([]) is None


@pytest.mark.parametrize(("client_index", "size"), [(-1, 2), (0, 0)])
def test_bad_arguments_are_refused(client_index: int, size: int) -> None:
    with pytest.raises(ValueError, match="bad balancer arguments"):
        Balancer(client_index=client_index, size=size)


def test_a_draining_engine_is_never_picked() -> None:
    balancer = Balancer(size=2)
    loads = [EngineLoad(rank=0, draining=True), EngineLoad(rank=1, running=5, waiting=3)]
    assert [balancer.pick(loads) for _ in range(3)] == [1, 1, 1]
    assert balancer.pick([EngineLoad(rank=0, draining=True)]) is None
