"""Every Python example in README.md and docs/*.md runs as written (issue 31 item 3, issue 35 item 7).

Each ```python block runs in its own namespace, in a temporary working folder, on tiny models:
``AutoModelForCausalLM.from_pretrained`` returns the tiny Llama of ``_tiny_models`` whatever path
the example names (nothing is downloaded). The names an example may use without defining them are
the ones a reader has at that point, listed in ``CONTEXT``: ``model`` (a trained PT-LoRA model: a
prefix and LoRA, the default config), ``inputs`` (a tokenised batch), ``train_dataset`` and
``loader`` (causal-LM batches), ``features`` and ``lengths`` (last-layer features).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ptpeft_fast as pf

from _tiny_models import VOCAB, load, model_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTEXT = ("model", "inputs", "train_dataset", "loader", "features", "lengths")


def _blocks() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.relative_to(ROOT)}#{i + 1}", code))
    return out


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _context() -> dict:
    model = pf.patch(load(), pf.PTPeftConfig())
    with torch.no_grad():  # "trained": LoRA away from its zero init, so exports carry something
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    ds = _Batches()
    g = torch.Generator().manual_seed(2)
    return {"model": model, "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "train_dataset": ds, "loader": torch.utils.data.DataLoader(ds, batch_size=4),
            "features": torch.randn(4, 12, 16, generator=g), "lengths": torch.tensor([12, 10, 7, 12])}


def test_the_docs_have_examples():
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("where,code", _blocks(), ids=[w for w, _ in _blocks()])
def test_example_runs_as_written(where, code, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"doc_example_{where}", **_context()}
    # the tiny Llama whatever the path, loaded quantized where the example asks (QLoRA)
    quant = ("quantization_config", "device_map")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(
        lambda cls, *a, **k: LlamaForCausalLM.from_pretrained(model_dir("llama"),
                                                              **{q: k[q] for q in quant if q in k})))
    try:
        exec(compile(code, where, "exec"), namespace)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
