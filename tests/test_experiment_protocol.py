"""The experiment protocol of issue 36: learning rates chosen on the validation split (never the
test split), stage 1 trained once per seed and shared by Prefix and the PT- methods, the paired
statistics and the pooled spectrum, on a tiny captioning model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_fast.train import main
from ptpeft_fast.train.config import ConfigError, load_config
from ptpeft_fast.train.paired import bootstrap_mean_interval, paired, t_interval, t_quantile, verdict
from ptpeft_fast.train.run_folder import read_records

TINY = ["model.name=tiny-blip2", "model.pretrained=false", "data.format=synthetic-shapes", "data.task=caption",
        "data.train={n: 48}", "data.val={n: 16}", "data.test={n: 12}", "eval.split=test",
        "stage1.batch_size=8", "stage2.batch_size=8", "stage1.max_steps=3", "stage2.max_steps=3",
        "stage1.prefix={num_tokens: 4, reparam: mlp, hidden_size: 16, components: [language]}",
        "eval.max_new_tokens=4", "eval.val_every=1", "eval.spectrum_samples=12",
        "eval.spectrum_text=prompt+target", "train.num_threads=1", "train.progress=false"]


def _args(out: Path, sets: list[str]) -> list[str]:
    """CLI arguments: a config file (without one the CLI runs its fixed demo) and the ``--set``s."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text("model: {name: tiny-blip2}\n")
    args = ["--config", str(config), "--output", str(out)]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "exp"
    sets = TINY + ["experiment.methods=[prefix, lora, pt-lora]", "experiment.seeds=[0, 1]",
                   "experiment.lr_sweep={seed: 9, grid: {stage1: [0.01, 0.03], lora: [0.002, 0.005], "
                   "pt-lora: [0.002, 0.005]}}"]
    assert main(_args(out, sets)) == 0
    return out


def test_rates_are_chosen_on_validation_and_the_sweep_never_reads_the_test_split(experiment):
    choice = json.loads((experiment / "lr_sweep.json").read_text())
    for key, stage in (("stage1", "stage1"), ("lora", "stage2"), ("pt-lora", "stage2")):
        finals = {}
        for lr in (0.01, 0.03) if key == "stage1" else (0.002, 0.005):
            sub = experiment / "lr-sweep" / key / f"lr{lr:g}"
            assert read_records(str(sub), "eval") == [] and not (sub / "predictions").exists()
            vals = [r for r in read_records(str(sub), "val") if r["stage"] == stage]
            assert [r["step"] for r in vals] == [1, 2, 3]
            assert read_records(str(sub), "train")[0]["lr"] != 0  # it trained
            finals[lr] = vals[-1]["loss"]
        best = min(finals, key=finals.get)
        assert (choice["stage1"] if key == "stage1" else choice["stage2"][key]) == best
    # the main runs use the choice
    cfg = (experiment / "pt-lora" / "seed1" / "config.yaml").read_text()
    assert f"lr: {choice['stage2']['pt-lora']}" in cfg and f"lr: {choice['stage1']}" in cfg
    assert "| stage1 |" in (experiment / "lr_sweep.md").read_text()


def test_pt_runs_start_stage_two_from_the_prefix_runs_stage_one(experiment):
    for seed in (0, 1):
        src = load_file(str(experiment / "prefix" / f"seed{seed}" / "checkpoints" / "stage1" / "ptpeft.safetensors"))
        pt = load_file(str(experiment / "pt-lora" / f"seed{seed}" / "checkpoints" / "stage1" / "ptpeft.safetensors"))
        assert set(src) < set(pt)  # the PT-LoRA checkpoint adds its (untrained) LoRA factors
        for name, t in src.items():
            assert torch.equal(t, pt[name]), name
        # its stage 1 was not trained again: no stage-1 records in the PT-LoRA run
        assert not [r for r in read_records(str(experiment / "pt-lora" / f"seed{seed}"), "train")
                    if r["stage"] == "stage1"]


def test_report_has_paired_differences_that_match_the_runs(experiment):
    groups = {g["key"]: g for g in json.loads((experiment / "groups.json").read_text())}
    md = (experiment / "results.md").read_text()
    a = {r["seed"]: r["metrics"]["CIDEr-D"] for r in groups["pt-lora"]["rows"]}
    b = {r["seed"]: r["metrics"]["CIDEr-D"] for r in groups["lora"]["rows"]}
    diffs = [a[s] - b[s] for s in (0, 1)]
    m, lo, hi = t_interval(diffs)
    row = next(line for line in md.splitlines() if line.startswith("| PT-LoRA vs LoRA | CIDEr-D |"))
    assert f"{diffs[0]:+.2f}, {diffs[1]:+.2f}" in row and f"{m:+.2f}" in row and verdict(lo, hi) in row
    assert "| PT-LoRA vs LoRA | effective rank |" in md and "pooled eff. rank" in md
    # per-record CIDEr-D: their mean is the corpus score
    for r in groups["lora"]["rows"]:
        per = r["per_record"]["CIDEr-D"]
        assert len(per) == 12 and math.isclose(sum(per.values()) / len(per), r["metrics"]["CIDEr-D"], rel_tol=1e-9)
        assert r["spectrum"]["pooled"]["n_tokens"] > 12 * 2  # prompt and caption tokens of every record
    assert "## Validation loss by step" in md and "train s / run" in md


def test_sweep_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lr_sweep.grid.adapter"):
        load_config(None, TINY + ["experiment.methods=[lora]", "experiment.lr_sweep={seed: 1, grid: {adapter: [1]}}"])
    with pytest.raises(ConfigError, match="set eval.val_every"):
        load_config(None, TINY + ["eval.val_every=0", "experiment.methods=[lora]",
                                  "experiment.lr_sweep={seed: 1, grid: {lora: [0.001]}}"])
    with pytest.raises(ConfigError, match="positive numbers"):
        load_config(None, TINY + ["experiment.methods=[lora]", "experiment.lr_sweep={seed: 1, grid: {lora: [-1]}}"])
    with pytest.raises(ConfigError, match="experiment.compare"):
        load_config(None, TINY + ["experiment.methods=[lora]", "experiment.compare=[[pt-lora, lora]]"])
    with pytest.raises(ConfigError, match="eval.val_every"):
        load_config(None, ["eval.val_every=-1"])


def test_t_interval_and_verdicts():
    m, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    h = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert m == 3.0 and math.isclose(lo, 3 - h) and math.isclose(hi, 3 + h)
    assert t_quantile(1) == 12.706 and t_quantile(100) == 1.960
    assert verdict(0.1, 2) == "supported" and verdict(-2, -0.1) == "not supported" and verdict(-1, 1) == "undecided"
    r = paired({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.5, 3: 9.0})  # seed 3 is unpaired
    assert r.seeds == (0, 1, 2) and r.differences == (2.0, 3.0, 1.5) and r.verdict == "supported"
    assert paired({0: 3.0}, {0: 1.0}).verdict.startswith("undecided")  # one seed decides nothing


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    xs = [float(i % 7) - 2.5 for i in range(200)]
    m, lo, hi = bootstrap_mean_interval(xs, seed=3)
    assert (m, lo, hi) == bootstrap_mean_interval(xs, seed=3)
    assert lo < m < hi
    # about ±1.96 standard errors
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))
    assert abs((hi - lo) / (2 * 1.96 * sd) - 1) < 0.15


def test_validation_loss_does_not_change_training(tmp_path):
    """The validation passes draw no random numbers and leave the model in training mode: the
    training losses are the same with and without them (LoRA dropout on, so any draw would
    show)."""
    losses = []
    for every in (0, 1):
        out = tmp_path / f"v{every}"
        assert main(_args(out, TINY + [f"eval.val_every={every}", "stage1.enabled=false", "eval.zero_shot=false",
                                       "eval.spectrum=false",
                                       "stage2.lora={r: 4, alpha: 8, dropout: 0.1, components: [language]}"])) == 0
        losses.append([r["loss"] for r in read_records(str(out), "train")])
        assert bool(read_records(str(out), "val")) == bool(every)
    assert losses[0] == losses[1]


def test_results_doc_states_the_protocol():
    doc = (Path(__file__).parent.parent / "docs" / "smollm2-code-captions-results.md").read_text()
    assert "## Protocol" in doc


def test_generation_stops_only_once_the_cut_prediction_is_final():
    """``eval.stop_at`` ends a sequence once its continuation, with leading whitespace stripped as
    the prediction is, contains the stop text: a newline written first (before any answer) does
    not stop it, which transformers' ``stop_strings`` would (and predictions would come out empty)."""
    from ptpeft_fast.train.evaluation import StopWhenCutIsFinal

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["".join({1: "\n", 2: "word", 3: " "}.get(int(i), "") for i in row) for row in ids]

    prompt = torch.tensor([[7, 8], [7, 9]])
    stop = StopWhenCutIsFinal(Tok(), "\n", prompt)
    seqs = torch.tensor([[7, 8, 1, 3, 2], [7, 9, 2, 1, 3]])  # "\n word" | "word\n "
    assert stop(seqs, None).tolist() == [False, True]
    assert stop(torch.tensor([[7, 8, 1, 2, 1], [7, 9, 3, 1, 1]]), None).tolist() == [True, False]
    # a model whose output does not repeat the prompt (encoder-decoder, one criterion per generate
    # call): the whole sequence is read
    stop = StopWhenCutIsFinal(Tok(), "\n", prompt)
    assert stop(torch.tensor([[2, 1], [1, 1]]), None).tolist() == [True, False]
