"""benchmarks/serve.py's reference figure: two passes around the server, or the first alone."""

from __future__ import annotations

import pytest

from benchmarks.serve import reference_result


def test_two_passes_give_tokens_over_their_mean_time() -> None:
    asked: list[list[int]] = []

    def second_pass(sizes: list[int]) -> tuple[int, float]:
        asked.append(sizes)
        return sizes[0], 30.0

    result = reference_result(6000, 32, 20.0, second_pass)
    assert asked == [[32]]  # only the best batch size runs again
    assert result["seconds_before"] == 20.0 and result["seconds_after"] == 30.0
    assert result["seconds"] == pytest.approx(25.0)
    assert result["tokens_per_s"] == pytest.approx(6000 / 25.0)


def test_a_failed_second_pass_leaves_the_first_alone() -> None:
    def second_pass(sizes: list[int]) -> tuple[int, float]:
        raise RuntimeError("CUDA out of memory")

    result = reference_result(6000, 64, 20.0, second_pass)
    assert result == {"batch_size": 64, "seconds": 20.0, "tokens_per_s": 300.0}
