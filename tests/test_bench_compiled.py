"""The torch.compile baseline of the benchmarks is compiled or it fails: never eager timed as
compiled (bench/benchutils.py)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from benchutils import CompiledForOneCase  # noqa: E402


def scaled_sum(x):
    return (x * 2).sum()


def test_compiled_case_runs_compiled_and_matches():
    case = CompiledForOneCase(scaled_sum, "aot_eager")
    x = torch.randn(5, 3)
    for _ in range(3):
        torch.testing.assert_close(case(x), scaled_sum(x))


def test_a_call_that_would_recompile_raises():
    case = CompiledForOneCase(scaled_sum, "aot_eager")
    case(torch.randn(5, 3))
    with pytest.raises(Exception, match="(?i)recompil"):
        case(torch.randn(7, 2))   # another static shape: a recompile, refused


def test_a_graph_break_raises():
    def breaks(x):
        print("a side effect dynamo cannot trace into a graph")  # noqa: T201
        return x.sum()

    with pytest.raises(Exception):
        CompiledForOneCase(breaks, "aot_eager")(torch.randn(3))


def test_each_case_starts_from_a_fresh_dynamo_state():
    """Nine shapes through one compiled object would pass dynamo's recompile limit (8) and run
    eager; nine cases, each with its own object, all compile."""
    for size in range(1, 10):
        case = CompiledForOneCase(scaled_sum, "aot_eager")
        x = torch.randn(size)
        torch.testing.assert_close(case(x), scaled_sum(x))
        torch.testing.assert_close(case(x), scaled_sum(x))
