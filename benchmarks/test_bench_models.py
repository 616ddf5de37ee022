"""CPU benchmarks of whole tiny-Llama steps against PEFT (issue 9). Cases: ``cases.py``."""
import pytest

from benchmarks.conftest import run_side


@pytest.mark.parametrize("side", ["ours", "peft_prefix", "floor"])
def test_prefix_train_L256(benchmark, side):
    run_side(benchmark, "prefix_train_L256", side)


@pytest.mark.parametrize("side", ["ours", "peft_prefix", "floor"])
def test_prefix_train_long(benchmark, side):
    run_side(benchmark, "prefix_train_long", side)


@pytest.mark.parametrize("side", ["ours", "peft_lora"])
def test_ptlora_train(benchmark, side):
    run_side(benchmark, "ptlora_train", side)


@pytest.mark.parametrize("side", ["ours", "no_prefix", "peft_prefix"])
def test_decode(benchmark, side):
    run_side(benchmark, "decode", side)


@pytest.mark.parametrize("side", ["ours", "peft", "ours_eager"])
def test_compiled_prefix_L256(benchmark, side):
    run_side(benchmark, "compiled_prefix_L256", side)


@pytest.mark.parametrize("side", ["ours", "peft", "ours_eager"])
def test_compiled_prefix_long(benchmark, side):
    run_side(benchmark, "compiled_prefix_long", side)


@pytest.mark.parametrize("side", ["ours", "peft", "ours_eager"])
def test_compiled_ptlora(benchmark, side):
    run_side(benchmark, "compiled_ptlora", side)
