"""Run the benchmark suite (or read its JSON) and write ``BENCHMARKS.md``.

    python benchmarks/report.py                          # run suite + memory, write BENCHMARKS.md
    python benchmarks/report.py --json bench.json        # read an existing --benchmark-json file
    python benchmarks/report.py --memory-json mem.json   # read memory results instead of measuring
    python benchmarks/report.py --no-memory --no-profile # skip those parts
    python benchmarks/report.py -k prefix_attention      # pass a -k filter to pytest

The suite is ``pytest benchmarks/ --benchmark-only --benchmark-json=...``. Every benchmark
carries ``extra_info`` (see benchmarks/README.md): ``case``, ``shape``, ``side``
(ours / peer / floor), ``impl``, ``target`` (largest allowed time ratio ours/side) and, on
the ours entry, ``paired_ratio`` (interleaved rounds). A target is judged on the paired
ratio when there is one (it is robust to load drifting between the sides' runs), else on
the ratio of the medians; both are printed.

For every missed target the report profiles ours and the side it missed against with
``torch.profiler`` (one warm run each, top operators by self CPU time) and puts the
tables under the case, followed by the hand-written analysis from
``benchmarks/analysis.md`` (the section whose heading is the case name).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIDE_ORDER = {"ours": 0, "peer": 1, "floor": 2}


# ---------------------------------------------------------------------------------------
# running / loading
# ---------------------------------------------------------------------------------------


def run_suite(json_path: Path, pytest_args: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "-o", "addopts=", "-q", *pytest_args]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=str(ROOT))


def _speedups(info: dict) -> dict[str, float]:
    """``speedup_vs_X`` / ``speedup_vs_X_median`` keys (peer time / ours): ``{X: speedup}``."""
    out: dict[str, float] = {}
    for key, val in info.items():
        m = re.fullmatch(r"speedup_vs_(.+?)(_median|_min)?", key)
        if m and isinstance(val, (int, float)) and m.group(2) != "_min":
            if m.group(2) == "_median" or m.group(1) not in out:
                out[m.group(1)] = float(val)
    return out


def _infer_side(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    side = info.get("side")
    if side in SIDE_ORDER:
        return side
    if _speedups(info):  # the entry that reports the ratios is ours (spectrum, GPU files)
        return "ours"
    text = " ".join(str(x) for x in (info.get("impl"), bench.get("param"), bench.get("name")) if x).lower()
    if "ours" in text:
        return "ours"
    if "floor" in text:
        return "floor"
    return "peer"


def _shape_text(shape: Any) -> str:
    if isinstance(shape, (list, tuple)):
        return "×".join(str(x) for x in shape)
    return str(shape)


def _case_of(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    return info.get("case") or bench.get("group") or re.sub(r"\[.*\]$", "", bench.get("name", "?"))


def collect(data: dict) -> dict[str, list[dict]]:
    """``{case: [entry, ...]}``, each entry a flat dict with the stats and extra_info."""
    cases: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        st = b.get("stats") or {}
        cases.setdefault(_case_of(b), []).append({
            "name": b.get("name"), "param": b.get("param"), "side": _infer_side(b),
            "side_name": info.get("side_name") or info.get("impl") or b.get("param") or b.get("name"),
            "impl": info.get("impl") or info.get("peer") or b.get("param") or b.get("name"),
            "shape": _shape_text(info.get("shape", "")), "median": st.get("median"), "min": st.get("min"),
            "mean": st.get("mean"), "stddev": st.get("stddev"), "iqr": st.get("iqr"), "rounds": st.get("rounds"),
            "info": info,
        })
    return cases


def _target_for(o: dict, side_name: str, info: dict) -> Optional[float]:
    """Largest allowed time ratio ours/side, from any of the conventions in README.md."""
    if info.get("target") is not None:
        return float(info["target"])
    oi = o["info"] if o else {}
    if isinstance(oi.get("targets"), dict) and oi["targets"].get(side_name) is not None:
        return float(oi["targets"][side_name])
    if oi.get(f"target_vs_{side_name}") is not None:  # a speed-up target: ours >= t× faster
        return 1.0 / float(oi[f"target_vs_{side_name}"])
    return None


def rows_for(case: str, entries: list[dict]) -> list[dict]:
    """One row per non-ours side: ratios, target, verdict."""
    ours = [e for e in entries if e["side"] == "ours"]
    rows = []
    if not ours:
        for e in entries:
            rows.append({"case": case, "shape": e["shape"], "ours": None, "other": e, "ratio": None,
                         "ratio_min": None, "paired": None, "target": _target_for(None, e["side_name"], e["info"]),
                         "target_text": e["info"].get("target_text"), "met": None})
        return rows
    o = ours[0]
    paired_all = o["info"].get("paired_ratio") or {}
    iqr_all = o["info"].get("paired_iqr") or {}
    ci_all = o["info"].get("paired_ci95") or {}
    speedups = _speedups(o["info"])
    seen = set()
    for e in sorted((e for e in entries if e["side"] != "ours"), key=lambda e: SIDE_ORDER.get(e["side"], 9)):
        info = e["info"]
        seen.add(e["side_name"])
        target = _target_for(o, e["side_name"], info)
        ratio = o["median"] / e["median"] if o["median"] and e["median"] else None
        ratio_min = o["min"] / e["min"] if o["min"] and e["min"] else None
        paired = paired_all.get(e["side_name"])
        judged = paired if paired is not None else ratio
        met = None if (target is None or judged is None) else judged <= target
        text = info.get("target_text")
        tkey = f"target_vs_{e['side_name']}"
        if text is None and o["info"].get(tkey) is not None:
            text = f"≥ {o['info'][tkey]:g}× faster"
        iqr = iqr_all.get(e["side_name"]) if paired is not None else None
        ci = ci_all.get(e["side_name"]) if paired is not None else None
        # the target inside the paired rounds' interquartile range: this run cannot tell met from missed
        close = None if (iqr is None or target is None) else iqr[0] <= target <= iqr[1]
        if ci is not None and target is not None:  # the 95 % interval decides where there is one
            met = True if ci[1] <= target else (False if ci[0] > target else None)
            close = met is None
        rows.append({"case": case, "shape": o["shape"] or e["shape"], "ours": o, "other": e, "ratio": ratio,
                     "ratio_min": ratio_min, "paired": paired, "paired_iqr": iqr, "paired_ci95": ci, "close": close,
                     "target": target, "target_text": text, "met": met})
    # peers timed only inside ours' test (GPU file: X_ms + speedup_vs_X, no entry of their own)
    for name, sp in speedups.items():
        if name in seen or sp <= 0:
            continue
        ms = o["info"].get(f"{name}_ms")
        other = {"side": "peer", "side_name": name, "impl": name, "median": None if ms is None else ms / 1000,
                 "min": None, "iqr": None, "info": {}, "shape": o["shape"]}
        target = _target_for(o, name, {})
        met = None if target is None else (1.0 / sp) <= target
        rows.append({"case": case, "shape": o["shape"], "ours": o, "other": other, "ratio": 1.0 / sp,
                     "ratio_min": None, "paired": None, "target": target,
                     "target_text": None if target is None else f"≥ {1 / target:g}× faster", "met": met})
    return rows


# ---------------------------------------------------------------------------------------
# profiling of missed targets
# ---------------------------------------------------------------------------------------


def profile_side(case_name: str, side: str, rows: int = 10) -> str:
    """Markdown table of the top operators (self CPU time) of one warm run of a side."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import cases

    if case_name not in cases.BUILDERS:
        return "_(not a case of cases.py: not profiled here)_"
    case = _profile_cache.get(case_name)
    if case is None:
        _profile_cache.clear()
        case = _profile_cache[case_name] = cases.BUILDERS[case_name]()
    fn = case.sides[side].run
    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ka = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ka) or 1
    out = ["| operator | calls | self CPU ms | share |", "|---|---:|---:|---:|"]
    for e in ka[:rows]:
        out.append(f"| `{e.key[:70]}` | {e.count} | {e.self_cpu_time_total / 1000:.1f} | "
                   f"{100 * e.self_cpu_time_total / total:.0f}% |")
    out.append(f"| **total** | | {total / 1000:.1f} | |")
    del torch
    return "\n".join(out)


_profile_cache: dict = {}


# ---------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 10 else f"{x:.2f} s"


def _r(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.3f}×"


def _cv(e: dict) -> Optional[float]:
    if not e or not e.get("iqr") or not e.get("median"):
        return None
    return e["iqr"] / e["median"]


def load_analysis(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def render(data: dict, memory: Optional[list[dict]], profiles: dict[str, list[tuple[str, str]]],
           analysis: dict[str, str], command: str) -> str:
    mi = data.get("machine_info") or {}
    cases = collect(data)
    all_rows = [r for c, es in cases.items() for r in rows_for(c, es)]
    lines = ["# Benchmarks", ""]
    lines.append("Generated by `python benchmarks/report.py` from `pytest benchmarks/ --benchmark-only` "
                 f"({data.get('datetime', _dt.datetime.now().isoformat())[:19]}). Do not edit by hand: "
                 "the analysis of missed targets lives in `benchmarks/analysis.md`.")
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    lines.append(f"- CPU: {mi.get('cpu_model') or (mi.get('cpu') or {}).get('brand_raw', '?')}, "
                 f"{mi.get('cpu_count', '?')} cores, torch threads {mi.get('torch_threads', '?')}")
    lines.append(f"- torch {mi.get('torch_version', '?')}, transformers {mi.get('transformers_version', '?')}, "
                 f"peft {mi.get('peft_version', '?')}, Python {mi.get('python', mi.get('python_version', '?'))}")
    loads = [e["info"].get("loadavg_start") for es in cases.values() for e in es
             if e["info"].get("loadavg_start") is not None]
    if loads:
        lines.append(f"- 1-minute load average while the suite ran: median {statistics.median(loads):.1f}, "
                     f"max {max(loads):.1f} on {mi.get('cpu_count', '?')} cores "
                     + ("(quiet)" if max(loads) < 2.5 else "(**shared machine: other jobs were running; "
                        "absolute times are inflated and noisy, compare ratios, above all the paired ones**)"))
    lines.append(f"- command: `{command}`")
    lines.append("")
    lines.append("## Time")
    lines.append("")
    lines.append("Ratio = time of ours / time of the side (lower is better for us); medians over rounds after "
                 "warm-up, same inputs, same process. *Paired* = median over interleaved rounds (each round runs "
                 "every side once, rotating the order) of t_ours/t_side: the verdict uses it when present; "
                 "in brackets the first and third quartiles over those rounds, and where the run recorded it "
                 "the 95 % bootstrap interval of that median: a target inside the interval is *undecided* "
                 "(more rounds needed), otherwise the interval decides; without an interval, *(within IQR)* "
                 "marks a verdict whose target lies between the quartiles (this run's noise can flip it). "
                 "Spread = IQR/median of the side's rounds.")
    lines.append("")
    lines.append("| case | shape | side | ours | side time | ratio (medians) | ratio (paired) | target | met "
                 "| spread ours / side |")
    lines.append("|---|---|---|---:|---:|---:|---:|---|---|---|")
    for r in all_rows:
        o, e = r["ours"], r["other"]
        tgt = r["target_text"] or ("" if r["target"] is None else f"≤ {float(r['target']):g}×")
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        if r.get("paired_ci95") and r["target"] is not None and r["met"] is None:
            met = "undecided (target inside the 95 % interval)"
        elif r.get("close"):
            met += " (within IQR)"
        paired = _r(r["paired"])
        if r.get("paired_iqr"):
            paired += f" ({r['paired_iqr'][0]:.3f}–{r['paired_iqr'][1]:.3f})"
        if r.get("paired_ci95"):
            paired += f"; 95 % {r['paired_ci95'][0]:.3f}–{r['paired_ci95'][1]:.3f}"
        cv_o, cv_e = _cv(o), _cv(e)
        spread = f"{'–' if cv_o is None else f'{cv_o:.0%}'} / {'–' if cv_e is None else f'{cv_e:.0%}'}"
        lines.append(f"| {r['case']} | {r['shape']} | {e['side']}: {e['impl']} | {_ms(o and o['median'])} | "
                     f"{_ms(e['median'])} | {_r(r['ratio'])} | {paired} | {tgt} | {met} | {spread} |")
    if memory:
        lines.append("")
        lines.append("## Peak memory")
        lines.append("")
        lines.append("Each side in a fresh process (`benchmarks/memory.py`): after a warm-up step the RSS high-water "
                     "mark is reset, then one step runs. *Step* = peak RSS − RSS before the step (what the step "
                     "adds: activations, saved tensors, grads); *peak* = `ru_maxrss` of the whole process "
                     "(interpreter, torch, every model copy the case holds). The target is judged on the step figure.")
        lines.append("")
        lines.append("| case | side | peak RSS | step | step ratio ours/peer | peak ratio | target | met |")
        lines.append("|---|---|---:|---:|---:|---:|---|---|")
        for m in memory:
            ratio = _r(m.get("ratio_step")) if "ratio_step" in m else ""
            pr = _r(m.get("ratio_peak")) if "ratio_peak" in m else ""
            tgt = "" if m.get("target") is None else f"≤ {m['target']:g}× {m.get('peer', '')}"
            met = "" if "met" not in m else ("yes" if m["met"] else "**no**")
            lines.append(f"| {m['case']} | {m['side']} | {m['peak'] / 2**20:.0f} MiB | {m['step'] / 2**20:.0f} MiB | "
                         f"{ratio} | {pr} | {tgt} | {met} |")
    missed = [r for r in all_rows if r["met"] is False]
    missed_mem = [m for m in (memory or []) if m.get("met") is False]
    lines.append("")
    lines.append("## Missed targets: what limits them")
    lines.append("")
    if not missed and not missed_mem:
        lines.append("None in this run.")
    for r in missed:
        iqr = r.get("paired_iqr")
        spread = f" [IQR {iqr[0]:.3f}–{iqr[1]:.3f}]" if iqr else ""
        lines.append(f"### {r['case']} vs {r['other']['side_name']} "
                     f"(paired {_r(r['paired'])}{spread}, medians {_r(r['ratio'])}, "
                     f"target {r['target_text'] or r['target']})")
        lines.append("")
        note = analysis.get(f"{r['case']} vs {r['other']['side_name']}") or analysis.get(r["case"])
        lines.append(note or "_No analysis written yet._")
        lines.append("")
        for side, table in profiles.get(f"{r['case']}/{r['other']['side_name']}", []):
            lines.append(f"Profile, one warm run of `{side}` (torch.profiler, self CPU time):")
            lines.append("")
            lines.append(table)
            lines.append("")
    for m in missed_mem:
        lines.append(f"### {m['case']} peak memory vs {m.get('peer')} (step ratio {_r(m.get('ratio_step'))})")
        lines.append("")
        lines.append(analysis.get(f"{m['case']} memory") or "_No analysis written yet._")
        lines.append("")
    skipped = [n for n in (data.get("_skipped") or [])]
    if skipped:
        lines.append("## Not run")
        lines.append("")
        lines += [f"- {s}" for s in skipped]
    extra = analysis.get("Notes")
    if extra:
        lines.append("## Notes")
        lines.append("")
        lines.append(extra)
    return "\n".join(lines).rstrip() + "\n"


def _memory_cases(k: Optional[str], cases: dict) -> Optional[list[str]]:
    """The memory cases a ``-k`` expression names (a case matching any of its words); None: all."""
    if not k:
        return None
    words = set(re.findall(r"[A-Za-z0-9_]+", k)) - {"or", "and", "not"}
    return [c for c in cases if any(w in c for w in words)]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks and write BENCHMARKS.md")
    ap.add_argument("--json", help="read this --benchmark-json file instead of running the suite")
    ap.add_argument("--save-json", default=str(ROOT / ".benchmarks" / "latest.json"),
                    help="where the suite run writes its JSON (default .benchmarks/latest.json)")
    ap.add_argument("--memory-json", help="read memory results (from memory.py --json) instead of measuring")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profiles-json", help="reuse profiles saved by an earlier report run")
    ap.add_argument("-k", dest="k", help="pytest -k expression")
    ap.add_argument("-o", "--output", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)

    command = "python benchmarks/report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if os.environ.get("BENCH_SCALE"):  # rounds multiplier: part of how the figures were taken
        command = f"BENCH_SCALE={os.environ['BENCH_SCALE']} {command}"
    if args.json:
        json_path = Path(args.json)
    else:
        json_path = Path(args.save_json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        rc = run_suite(json_path, ["-k", args.k] if args.k else [])
        if rc not in (0, 5) and not json_path.exists():
            print(f"benchmark run failed (exit {rc}) and wrote no JSON", file=sys.stderr)
            return rc
    data = json.loads(json_path.read_text())

    memory = None
    if args.memory_json:
        memory = json.loads(Path(args.memory_json).read_text())
    elif not args.no_memory:
        from benchmarks import memory as mem

        memory = mem.run_all(_memory_cases(args.k, mem.MEMORY_CASES))
        (json_path.parent / "memory.json").write_text(json.dumps(memory, indent=2))

    profiles: dict[str, list[tuple[str, str]]] = {}
    if args.profiles_json:
        profiles = {k: [tuple(x) for x in v] for k, v in json.loads(Path(args.profiles_json).read_text()).items()}
    elif not args.no_profile:
        for c, es in collect(data).items():
            for r in rows_for(c, es):
                if r["met"] is False:
                    key = f"{c}/{r['other']['side_name']}"
                    try:
                        profiles[key] = [(s, profile_side(c, s)) for s in ("ours", r["other"]["side_name"])]
                    except Exception as exc:  # a profile must not lose the report
                        profiles[key] = [("ours", f"_profiling failed: {exc!r}_")]
        (json_path.parent / "profiles.json").write_text(json.dumps(profiles, indent=1))
    analysis = load_analysis(ROOT / "benchmarks" / "analysis.md")
    text = render(data, memory, profiles, analysis, command)
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
