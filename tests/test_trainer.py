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


# ------------------------------------------------------------ one Trainer for both stages (issue 31)
def _args(tmp_path, steps: int = 3):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.01, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}


def test_one_trainer_with_stage_callback_trains_lora_in_stage_two(tmp_path):
    from transformers import Trainer

    model = _patched("prefix")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyLM(), callbacks=[pf.StageCallback()])
    trainer.train()
    stage1_optimizer = trainer.optimizer
    b = _lora_b(model)
    assert b and all(torch.equal(v, torch.zeros_like(v)) for v in b.values())  # stage 1 left LoRA at its init
    pf.set_stage(model, "peft")
    before = _snapshot(model)
    trainer.train()
    assert trainer.optimizer is stage1_optimizer  # the same object the Trainer holds, rebuilt inside
    changed = {n for n, v in _lora_b(model).items() if not torch.equal(v, b[n])}
    assert changed == set(b), f"{len(b) - len(changed)} of {len(b)} lora_B tensors did not train"
    groups = _changed_groups(model, before)
    assert groups["lora"] and groups["prefix"] and not groups["base"]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in inner.param_groups] == [0.01, 0.0]  # the Trainer's own split


def test_one_trainer_without_the_callback_stops_with_the_fix(tmp_path):
    from transformers import Trainer

    model = _patched("prefix")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyLM())
    trainer.train()
    pf.set_stage(model, "peft")
    with pytest.raises(pf.StaleOptimizerError, match=r"lora_[AB].*StageCallback"):
        trainer.train()


def test_a_trainer_built_before_set_stage_but_not_yet_trained_trains_the_new_stage(tmp_path):
    """The real rule: the Trainer builds its optimizer at its first train(), not at construction."""
    from transformers import Trainer

    model = _patched("prefix")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TinyLM())
    pf.set_stage(model, "peft")
    b = _lora_b(model)
    trainer.train()
    assert all(not torch.equal(v, b[n]) for n, v in _lora_b(model).items())


def test_a_plain_loop_that_kept_its_stage_one_optimizer_is_stopped():
    model = _patched("prefix")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = TinyLM()[0]["input_ids"][None]

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    pf.set_stage(model, "peft")
    step()  # the first step after the change is allowed: a second optimizer may hold the rest
    with pytest.raises(pf.StaleOptimizerError, match="set_stage"):
        step()
    # a new optimizer after set_stage is fine, and so is going on in the same stage
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        step()


def test_a_deliberate_split_over_two_optimizers_passes():
    model = _patched("peft")
    groups = parameter_groups(model)
    prefix = [p for n, p in model.named_parameters() if p.requires_grad and groups[n] == "prefix"]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and groups[n] == "lora"]
    opts = [torch.optim.SGD(prefix, lr=1e-2), torch.optim.SGD(lora, lr=1e-2)]
    ids = TinyLM()[0]["input_ids"][None]
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()


def test_an_optimizer_of_an_earlier_stage_does_not_cover_the_new_one():
    """Only optimizers that step after the stage change count towards what trains."""
    model = _patched("peft")
    ids = TinyLM()[0]["input_ids"][None]
    stage2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # holds LoRA too
    model(input_ids=ids, labels=ids).loss.backward()
    stage2.step()
    pf.set_stage(model, "prefix")
    stage1 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        stage1.step()
        stage1.zero_grad()
    pf.set_stage(model, "peft")
    with pytest.raises(pf.StaleOptimizerError):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            stage1.step()
            stage1.zero_grad()


def test_trainer_evaluate_with_compute_metrics_sees_the_logits(tmp_path):
    """Training takes the fused loss (no logits); Trainer.evaluate runs in eval mode, where the model
    computes its logits as before, so compute_metrics gets them."""
    from transformers import Trainer

    model = _patched("peft")
    seen = []

    def compute_metrics(pred):
        seen.append(pred.predictions.shape)
        return {"n": float(len(pred.label_ids))}

    args = _args(tmp_path)
    args.eval_strategy = "no"
    trainer = Trainer(model=model, args=args, train_dataset=TinyLM(), eval_dataset=TinyLM(n=4),
                      compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert seen and seen[0][-1] == model.config.vocab_size and metrics["eval_n"] == 4.0
    assert metrics["eval_loss"] > 0
