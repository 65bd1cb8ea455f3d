"""The scale-out settings: derived counts and the refusals of incoherent combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubellm.protocol.settings import ParallelSettings, ServeSettings


def test_single_shape_by_default() -> None:
    p = ParallelSettings()
    assert (p.api_servers, p.local_engines, p.required_engines, p.remote_engines) == (
        1,
        1,
        1,
        False,
    )


def test_api_server_count_defaults_to_the_data_parallel_size() -> None:
    p = ParallelSettings(data_parallel_size=4)
    assert (p.api_servers, p.local_engines, p.remote_engines) == (4, 4, False)


def test_head_without_local_engines_waits_for_remote_ones() -> None:
    p = ParallelSettings(data_parallel_size=2, data_parallel_size_local=0, api_server_count=1)
    assert (p.api_servers, p.local_engines, p.required_engines, p.remote_engines) == (1, 0, 2, True)


def test_headless_host_runs_no_api_server() -> None:
    p = ParallelSettings(
        headless=True, data_parallel_size=4, data_parallel_size_local=2, data_parallel_start_rank=2
    )
    assert (p.api_servers, p.local_engines, p.remote_engines) == (0, 2, True)


def test_headless_local_count_defaults_to_the_ranks_left() -> None:
    p = ParallelSettings(headless=True, data_parallel_size=4, data_parallel_start_rank=1)
    assert p.local_engines == 3


def test_min_ready_engines_lowers_the_requirement() -> None:
    assert ParallelSettings(data_parallel_size=4, min_ready_engines=3).required_engines == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"headless": True, "api_server_count": 2}, "--headless runs no API server"),
        ({"api_server_count": 0}, "--api-server-count 0 is only valid with --headless"),
        (
            {"headless": True, "data_parallel_size": 2, "data_parallel_start_rank": 2},
            "--data-parallel-start-rank 2 is beyond --data-parallel-size 2",
        ),
        (
            {
                "headless": True,
                "data_parallel_size": 4,
                "data_parallel_start_rank": 3,
                "data_parallel_size_local": 2,
            },
            "needs ranks up to 4, beyond --data-parallel-size 4",
        ),
        (
            {"headless": True, "data_parallel_size_local": 0},
            "--headless with --data-parallel-size-local 0 runs nothing",
        ),
        (
            {"data_parallel_size": 2, "data_parallel_start_rank": 1},
            "only --headless hosts take a --data-parallel-start-rank",
        ),
        ({"data_parallel_size": 2, "min_ready_engines": 3}, "--min-ready-engines 3 is more than"),
        ({"data_parallel_address": "0.0.0.0"}, "not a wildcard"),
        ({"data_parallel_address": "[::]"}, "not a wildcard"),
    ],
)
def test_incoherent_combinations_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("-", r"\-")):
        ServeSettings(parallel=ParallelSettings.model_validate(kwargs))
