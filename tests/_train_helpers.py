"""Shared settings for the training tests: a random-init tiny-blip2 on a few
synthetic-shapes samples, one thread, no progress bars."""
import json
import os

from safetensors.torch import load_file

BASE = ["model.pretrained=false", "data.train.n=48", "data.val.n=4", "stage1.max_steps=4",
        "stage2.max_steps=4", "stage1.batch_size=8", "stage2.batch_size=8", "eval.batch_size=16",
        "eval.max_new_tokens=2", "eval.spectrum_samples=8", "train.progress=false", "train.num_threads=1",
        "train.log_every=1", "stage1.prefix.num_tokens=4", "stage1.prefix.hidden_size=32"]


def cfg(*extra):
    from ptpeft_fast.train.config import load_config
    return load_config(None, BASE + list(extra))


def write_yaml(path, *extra):
    from ptpeft_fast.train.config import dump_config
    path.write_text(dump_config(cfg(*extra)))
    return str(path)


def events(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == kind]


def checkpoint_tensors(out, stage):
    return load_file(os.path.join(out, "checkpoints", stage, "ptpeft.safetensors"))
