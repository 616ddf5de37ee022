"""Whether a QLoRA training step still gets its LoRA gradients after one evaluation pass, for PEFT
and for ptpeft_fast, on a tiny Llama loaded in NF4 by bitsandbytes on this CPU (README,
"Compared with PEFT and AdapterHub").

bitsandbytes (0.48+) on a CPU with AVX512-BF16 repacks a 4-bit weight the first time the layer
runs in eval mode without gradients, and from then on multiplies through ``gemv_4bit``: bfloat16,
with no autograd formula. Each method is judged against itself: the same model, the same step,
with and without one ``torch.no_grad`` evaluation forward before it. On a CPU without
AVX512-BF16 nothing is repacked and both keep their gradients.

    python tools/qlora_eval_gradients.py
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptpeft_fast as pf  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def tiny_llama_folder() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tempfile.mkdtemp(prefix="qlora_eval_")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def nf4(path: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")


def lora_grads(make, evaluate_first: bool) -> dict[str, torch.Tensor | None]:
    model = make()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    if evaluate_first:
        with torch.no_grad():
            model.eval()(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def main() -> int:
    warnings.filterwarnings("ignore")
    from peft import LoraConfig, get_peft_model
    path = tiny_llama_folder()

    def peft_model():
        torch.manual_seed(2)
        return get_peft_model(nf4(path), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                                    init_lora_weights=False))

    def ours():
        torch.manual_seed(2)
        model = pf.patch(nf4(path), pf.PTPeftConfig(prefix=None, lora={"r": 4, "targets": TARGETS}))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        pf.set_stage(model, "peft")
        return model

    for name, make in (("PEFT QLoRA", peft_model), ("ptpeft_fast", ours)):
        a, b = lora_grads(make, False), lora_grads(make, True)
        lost = [n for n in a if b[n] is None]
        changed = [n for n in a if b[n] is not None and not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-7)]
        print(f"{name}: {len(a)} LoRA tensors; after one evaluation pass {len(lost)} get no gradient and "
              f"{len(changed)} a different one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
