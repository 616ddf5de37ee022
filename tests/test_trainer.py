"""A patched model trains with the Hugging Face Trainer and with accelerate; only PT-PEFT parameters change."""
from __future__ import annotations

import pytest
import torch

import ptpeft_fast as pf
from ptpeft_fast.stages import parameter_groups

from _tiny_models import VOCAB, load


class TinyLM(torch.utils.data.Dataset):
    """Random token sequences with labels = inputs (causal LM)."""

    def __init__(self, n: int = 8, length: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed_groups(model, before) -> dict[str, bool]:
    """For each group, whether any of its parameters changed."""
    groups = parameter_groups(model)
    out: dict[str, bool] = {}
    for n, p in model.named_parameters():
        out[groups[n]] = out.get(groups[n], False) or not torch.equal(p.detach(), before[n])
    return out


def _patched(stage: str):
    model = pf.patch(load(), pf.PTPeftConfig(prefix=pf.PrefixConfig(num_tokens=4, hidden_size=16),
                                             lora=pf.LoraConfig(r=4)))
    pf.set_stage(model, stage)
    return model


@pytest.mark.parametrize("stage,changes", [("prefix", {"prefix"}), ("peft", {"prefix", "lora"})])
def test_hf_trainer_trains_only_ptpeft_parameters(stage, changes, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _patched(stage)
    before = _snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TinyLM())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    changed = _changed_groups(model, before)
    assert {g for g, c in changed.items() if c} == changes
    assert changed["base"] is False  # every base weight is bit-identical
    # the trained PT-PEFT state saves and loads into a fresh model
    pf.save(model, tmp_path / "ckpt")
    fresh = pf.load(load(), tmp_path / "ckpt")
    trained = {n: p for n, p in model.named_parameters() if parameter_groups(model)[n] != "base"}
    for n, p in fresh.named_parameters():
        if n in trained:
            assert torch.equal(p, trained[n])


def test_accelerate_prepare_trains_only_ptpeft_parameters():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        model = _patched("peft")
        before = _snapshot(model)
        accelerator = Accelerator(cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loader = torch.utils.data.DataLoader(TinyLM(), batch_size=4)
        model_p, opt, loader = accelerator.prepare(model, opt, loader)
        model_p.train()
        for batch in loader:
            loss = model_p(**batch).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        unwrapped = accelerator.unwrap_model(model_p)
        assert unwrapped is model or unwrapped._ptpeft is model._ptpeft
        changed = _changed_groups(model, before)
        assert changed["base"] is False and changed["prefix"] and changed["lora"]
    finally:
        AcceleratorState._reset_state(True)
