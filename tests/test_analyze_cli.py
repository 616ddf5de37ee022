"""python -m ptpeft_fast.analyze: pretrained vs PT-PEFT checkpoints on a tiny Llama."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from ptpeft_fast import analyze


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny Llama (from a config, save_pretrained), a word-level tokenizer, data and a checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import ptpeft_fast

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    words = ["[PAD]"] + [f"w{i}" for i in range(63)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[PAD]", pad_token="[PAD]").save_pretrained(root / "model")

    model = LlamaForCausalLM.from_pretrained(root / "model")
    ptpeft_fast.patch(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)  # a "trained" checkpoint that differs from init
    ptpeft_fast.save(model, root / "ckpt")

    gen = torch.Generator().manual_seed(1)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(9):
            n = int(torch.randint(2, 16, (1,), generator=gen))
            f.write(json.dumps({"input_ids": torch.randint(1, 64, (n,), generator=gen).tolist()}) + "\n")
    (root / "data.txt").write_text("w1 w2 w3 w4\nw5 w6\nw7 w8 w9 w10 w11 w12\n")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_pretrained_vs_checkpoint(workspace, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ptpeft_fast.analyze", "--model", str(workspace / "model"),
           "--checkpoints", str(workspace / "ckpt"), "--names", "pretrained", "pt-peft",
           "--data", str(workspace / "data.jsonl"), "--out", str(out), "--batch-size", "4", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| pretrained |" in res.stdout and "| pt-peft |" in res.stdout
    assert "sample" in res.stderr  # tqdm progress bar
    rows = read_csv(out / "summary.csv")
    assert [r["name"] for r in rows] == ["pretrained", "pt-peft"]
    assert all(int(r["n_samples"]) == 9 for r in rows)
    assert all(0 < float(r["remaining_rank_ratio"]) <= 1 and float(r["effective_rank"]) >= 1 for r in rows)
    assert float(rows[1]["effective_rank"]) != float(rows[0]["effective_rank"])  # the checkpoint was applied
    assert (out / "summary.md").read_text().count("\n") == 4
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = read_csv(out / "curves.csv")
    longest = max(len(json.loads(row)["input_ids"]) for row in (workspace / "data.jsonl").read_text().splitlines())
    assert len(curves) == longest and float(curves[-1]["pretrained"]) == pytest.approx(1.0)


def test_cli_text_data_pretrained_only(workspace, tmp_path):
    out = tmp_path / "out"
    rc = analyze.main(["--model", str(workspace / "model"), "--data", str(workspace / "data.txt"),
                       "--out", str(out), "--no-progress", "--threshold", "0.5", "--backend", "torch"])
    assert rc == 0
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 1 and rows[0]["name"] == "pretrained" and int(rows[0]["n_samples"]) == 3
    assert "τ=0.5" in (out / "summary.md").read_text()


def test_cli_errors(workspace, tmp_path):
    base = ["--model", str(workspace / "model"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="not a directory written by ptpeft_fast.save"):
        analyze.main(base + ["--data", str(workspace / "data.jsonl"), "--checkpoints", str(tmp_path)])
    with pytest.raises(SystemExit, match="--names needs 2 labels"):
        analyze.main(base + ["--data", str(workspace / "data.jsonl"), "--checkpoints", str(workspace / "ckpt"),
                             "--names", "a"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze.main(base + ["--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="neither 'input_ids'"):
        analyze.main(base + ["--data", str(bad)])


def test_make_batches_pads_right_and_groups():
    batches = analyze.make_batches([[1, 2, 3], [4], [5, 6]], batch_size=2, pad_id=9)
    assert batches[0]["input_ids"].tolist() == [[4, 9], [5, 6]]
    assert batches[0]["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batches[1]["input_ids"].tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError):
        analyze.make_batches([[1]], batch_size=0)
