"""How far a packed row's logits are from each document's logits alone, for prefix tuning with
PEFT and with ptpeft_fast (README, "Compared with PEFT and AdapterHub").

A packed row is built as transformers' ``DataCollatorWithFlattening`` builds it: the documents
back to back, ``position_ids`` restarting at 0 per document, no attention mask. Each method is
judged against its own forward pass over each document alone (never against the other). PEFT's
prefix rides on a KV cache, and transformers skips packed-sequence detection when a cache is
present, so its documents attend to each other.

    python tools/packing_gap.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ptpeft_fast as pf  # noqa: E402


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def gap(model, docs) -> float:
    """Max |packed - alone| over the logits of every token."""
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits
        alone = torch.cat([model(input_ids=d[None]).logits for d in docs], 1)
    return float((packed - alone).abs().max())


def main() -> None:
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny_llama()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g) for n in (7, 12, 5)]
    peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    ours = pf.patch(copy.deepcopy(base), {"prefix": {"num_tokens": 8, "reparam": "none"}})
    with torch.no_grad():  # prefixes of the same scale in both
        for p in list(peft_model.parameters()) + list(ours.parameters()):
            if p.requires_grad:
                p.normal_(0, 1, generator=g)
    print(f"3 documents of {[len(d) for d in docs]} tokens packed in one row (position ids restarting, no mask)")
    print(f"max |logit gap|, packed vs each document alone: PEFT prefix tuning {gap(peft_model.eval(), docs):.3g}, "
          f"ptpeft_fast {gap(ours.eval(), docs):.3g}")


if __name__ == "__main__":
    main()
