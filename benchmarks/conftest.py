"""pytest-benchmark plumbing shared by the CPU benchmark files (see benchmarks/README.md).

``run_side(benchmark, case_name, side)`` times one side of a case from ``cases.py`` with
``benchmark.pedantic`` (warm-up rounds, then ``rounds`` timed rounds of one call each) and
fills ``benchmark.extra_info`` with the keys ``report.py`` reads:

    case, shape, side ("ours" | "peer" | "floor"), impl, peer, target, target_text

For the ``ours`` side it also runs a *paired* measurement: rounds in which every side of
the case runs once, in rotating order, so that load from other processes hits all sides
alike; ``extra_info["paired_ratio"][side]`` is the median over rounds of
``t_ours / t_side``.

Environment knobs: ``BENCH_SCALE`` multiplies the number of rounds (default 1);
``BENCH_PAIRED=0`` turns the paired measurement off.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks import machine  # noqa: E402

_cases: dict = {}
_results: dict[str, dict[str, dict]] = {}


def _scale() -> float:
    try:
        return max(0.1, float(os.environ.get("BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


def get_case(name: str):
    """Build (once per session) the case ``name`` at its benchmark shape."""
    if name not in _cases:
        from benchmarks import cases

        _cases.clear()  # one case alive at a time: the model cases hold three model copies
        import gc

        gc.collect()
        _cases[name] = cases.BUILDERS[name]()
    return _cases[name]


def paired_round_ratios(case, rounds: int) -> dict[str, list[float]]:
    """Per-round t_ours / t_side, every round running all sides (rotating order)."""
    names = list(case.sides)
    for n in names[1:]:  # ours is warm already; warm the others
        case.sides[n].run()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            case.sides[n].run()
            times[n].append(time.perf_counter() - t0)
    return {n: [o / t for o, t in zip(times["ours"], times[n], strict=True)] for n in names if n != "ours"}


def paired_ratios(case, rounds: int) -> dict[str, float]:
    """Median over rounds of t_ours / t_side (see :func:`paired_round_ratios`)."""
    return {n: statistics.median(r) for n, r in paired_round_ratios(case, rounds).items()}


def quartiles(values: list[float]) -> list[float]:
    """[first quartile, third quartile] of the per-round ratios (the spread a verdict sits in)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def median_ci95(values: list[float], resamples: int = 4000) -> list[float]:
    """95 % bootstrap interval (percentile) of the median of the per-round ratios, seeded: the
    interval a verdict needs to clear (the issues' rule: a target inside it is undecided)."""
    import random

    if len(values) < 2:
        return [values[0], values[0]]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def run_side(benchmark, case_name: str, side_name: str) -> None:
    case = get_case(case_name)
    if side_name not in case.sides and side_name in case.extra.get("optional_sides", {}):
        pytest.skip(f"{case_name}/{side_name}: {case.extra['optional_sides'][side_name]}")
    side = case.sides[side_name]
    benchmark.group = case.name
    info = benchmark.extra_info
    info.update(case=case.name, shape=case.shape, side=side.kind, side_name=side.name, impl=side.impl,
                loadavg_start=os.getloadavg()[0])
    if side.kind != "ours":
        info.update(peer=side.impl, target=side.target, target_text=side.target_text)
    if "tokens" in case.extra:
        info["tokens"] = case.extra["tokens"]
    rounds = max(2, round(case.rounds * _scale()))
    benchmark.pedantic(side.run, rounds=rounds, warmup_rounds=case.warmup, iterations=1)
    if side.kind == "ours" and os.environ.get("BENCH_PAIRED", "1") != "0" and not benchmark.disabled:
        per_round = paired_round_ratios(case, rounds)
        info["paired_ratio"] = {n: statistics.median(r) for n, r in per_round.items()}
        info["paired_iqr"] = {n: quartiles(r) for n, r in per_round.items()}
        info["paired_ci95"] = {n: median_ci95(r) for n, r in per_round.items()}
        info["paired_rounds"] = rounds
    if "compile_s" in case.extra:  # first call of each compiled side, compilation included
        info["compile_s"] = dict(case.extra["compile_s"])
    info["loadavg_end"] = os.getloadavg()[0]
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _results.setdefault(case.name, {})[side.name] = {
            "median": stats.stats.median, "min": stats.stats.min, "kind": side.kind,
            "target": side.target, "paired": info.get("paired_ratio"),
        }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine.info())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    tr = terminalreporter
    tr.section("ptpeft_fast benchmark ratios (ours / side, time; median of rounds)")
    for case, sides in _results.items():
        ours = sides.get("ours")
        if ours is None:
            continue
        for name, r in sides.items():
            if name == "ours":
                continue
            ratio = ours["median"] / r["median"]
            paired = (ours.get("paired") or {}).get(name)
            tgt = r["target"]
            verdict = "" if tgt is None else ("met" if (paired if paired is not None else ratio) <= tgt else "MISSED")
            tr.write_line(f"{case:20s} vs {name:16s} ratio {ratio:6.3f}"
                          + ("" if paired is None else f"  paired {paired:6.3f}")
                          + ("" if tgt is None else f"  target <= {tgt:.3f}  {verdict}"))
