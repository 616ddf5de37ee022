"""The embedded demo (``--quick``, shrunk further here) writes results.md and spectrum.png,
and the pre-trained tiny-blip2 is cached and reused."""
import os

from ptpeft_fast.train import main, pretrain

SMALL = ["data.train.n=24", "data.val.n=3", "stage1.max_steps=3", "stage2.max_steps=3", "stage1.batch_size=8",
         "stage2.batch_size=8", "eval.spectrum_samples=6", "eval.batch_size=16", "train.progress=false",
         "stage1.prefix.num_tokens=4", "stage1.prefix.hidden_size=32"]


def test_quick_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTPEFT_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPES, "quick", {"n_train": 16, "steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 0})
    out = tmp_path / "demo"
    args = ["--quick", "--output", str(out)]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    text = (out / "results.md").read_text()
    for m in ("zero-shot", "Prefix", "| LoRA", "PT-LoRA", "| Adapter", "PT-Adapter"):
        assert m in text
    assert (out / "spectrum.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "PT-Adapter" in printed and str(out / "spectrum.png") in printed
    cached = pretrain.recipe_path("quick")
    assert os.path.isfile(os.path.join(cached, "config.json"))
    mtime = os.path.getmtime(os.path.join(cached, "config.json"))
    assert pretrain.ensure_tiny_pretrained("quick") == cached        # reused, not retrained
    assert os.path.getmtime(os.path.join(cached, "config.json")) == mtime
