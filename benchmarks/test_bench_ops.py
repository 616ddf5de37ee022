"""CPU benchmarks of the three ops against their peers (issue 9). Cases: ``cases.py``."""
import pytest

from benchmarks.conftest import run_side


@pytest.mark.parametrize("side", ["ours", "sdpa_no_prefix", "concat_mask"])
def test_prefix_attention(benchmark, side):
    run_side(benchmark, "prefix_attention", side)


@pytest.mark.parametrize("side", ["ours", "bare_linear", "peft_lora"])
def test_lora_linear(benchmark, side):
    run_side(benchmark, "lora_linear", side)


@pytest.mark.parametrize("side", ["ours", "unfused"])
def test_adapter(benchmark, side):
    run_side(benchmark, "adapter", side)


@pytest.mark.parametrize("side", ["ours", "unfused", "cce_torch_compile"])
def test_linear_cross_entropy(benchmark, side):
    run_side(benchmark, "linear_cross_entropy", side)


@pytest.mark.parametrize("side", ["ours", "unfused", "cce_torch_compile"])
def test_linear_cross_entropy_V262k(benchmark, side):
    run_side(benchmark, "linear_cross_entropy_V262k", side)


@pytest.mark.parametrize("side", ["ours", "dense_mask"])
def test_varlen_attention(benchmark, side):
    run_side(benchmark, "varlen_attention", side)
