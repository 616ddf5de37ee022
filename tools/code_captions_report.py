"""Write the SmolLM2 code-captions protocol's results into the README and the results document.

Reads an experiment folder of ``ptpeft_fast/configs/smollm2-code-captions.yaml`` (its
``results.md``, ``groups.json``, ``lr_sweep.json``/``.md`` and ``spectrum.png``). It counts only
whole seeds, that is seeds whose every method has run. It rewrites the README's block between the
``smollm2-results`` markers and the results document's ``## Results`` section (up to the next
``##``), and copies the spectrum plot into ``docs/img``. Nothing else is changed.

    python tools/code_captions_report.py runs/smollm2-code-captions
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ptpeft_fast.train.comparison_report import paired_results, spectrum_value  # noqa: E402
from ptpeft_fast.train.report import mean_pm_std  # noqa: E402

START, END = "<!-- smollm2-results:start -->", "<!-- smollm2-results:end -->"
PAIRS = [["pt-lora", "lora"], ["pt-adapter", "adapter"]]


def whole_seed_groups(groups: list[dict]) -> tuple[list[dict], list[int]]:
    """The groups restricted to the seeds every trained method has run (zero-shot: seed-free)."""
    trained = [g for g in groups if g["key"] != "zero-shot"]
    done = sorted(set.intersection(*({r["seed"] for r in g["rows"]} for g in trained))) if trained else []
    return [dict(g, rows=[r for r in g["rows"] if r["seed"] in done or g["key"] == "zero-shot"])
            for g in groups], done


def tables(groups: list[dict]) -> tuple[str, str]:
    rows = ["| method | CIDEr-D | BLEU-4 | ROUGE-L | pooled effective rank | pooled remaining-rank ratio "
            "| train s / run |", "|---|---|---|---|---|---|---|"]
    for g in groups:
        rs = g["rows"]
        if not rs:
            continue
        name = f"**{g['method']}**" if g["key"].startswith("pt-") else g["method"]
        rows.append(f"| {name} | {mean_pm_std([r['metrics']['CIDEr-D'] for r in rs])} | "
                    f"{mean_pm_std([r['metrics']['BLEU-4'] for r in rs])} | "
                    f"{mean_pm_std([r['metrics']['ROUGE-L'] for r in rs])} | "
                    f"{mean_pm_std([spectrum_value(r, 'effective_rank') for r in rs], 1)} | "
                    f"{mean_pm_std([spectrum_value(r, 'remaining_rank_ratio') for r in rs], 3)} | "
                    f"{sum(r.get('train_seconds', 0) for r in rs) / len(rs):.0f} |")
    paired = ["| comparison | measure | per seed (PT-X − X) | mean | 95 % interval (t over seeds) "
              "| verdict: PT-X higher |", "|---|---|---|---|---|---|"]
    for _, name, res in paired_results(groups, PAIRS, "CIDEr-D"):
        for measure, r in res.items():
            d = {"CIDEr-D": 2, "effective rank": 1}.get(measure, 4)
            per_seed = ", ".join(f"{x:+.{d}f}" for x in r.differences)
            paired.append(f"| {name} | {measure} | {per_seed} | {r.mean:+.{d}f} | "
                          f"[{r.low:+.{d}f}, {r.high:+.{d}f}] | {r.verdict} |")
    return "\n".join(rows), "\n".join(paired)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    run = Path(argv[0])
    groups, done = whole_seed_groups(json.loads((run / "groups.json").read_text()))
    if not done:
        print(f"{run}: no whole seed yet")
        return 1
    seeds = len(yaml.safe_load((run / "config.yaml").read_text())["experiment"]["seeds"])
    status = (f"all {seeds} seeds" if len(done) == seeds else
              f"{len(done)} of the protocol's {seeds} seeds ({'seed' if len(done) == 1 else 'seeds'} "
              f"{', '.join(map(str, done))}; the run goes on: the same command resumes it)")
    table, paired = tables(groups)
    sweep = json.loads((run / "lr_sweep.json").read_text())
    rates = f"stage 1 {sweep['stage1']:g}; stage 2: " + ", ".join(f"{k} {v:g}" for k, v in sweep["stage2"].items())
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = (f"{START}\nLearning rates chosen: {rates}.\n\n**Results: {status}.** Mean ± std over seeds "
             f"(one seed: its value):\n\n{table}\n\n{paired}\n{END}")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    readme.write_text(text)
    # the results document: the experiment's own report and the sweep
    if (run / "spectrum.png").exists():
        shutil.copy(run / "spectrum.png", ROOT / "docs" / "img" / "smollm2-code-captions-protocol-spectrum.png")
    report = (run / "results.md").read_text()
    report = re.sub(r"^# .*\n", "", report, count=1).replace("\n## ", "\n### ")
    report = report.replace("![spectrum](spectrum.png)", "![spectrum](img/smollm2-code-captions-protocol-spectrum.png)")
    sweep_md = (run / "lr_sweep.md").read_text().replace("# Learning-rate sweep", "### Learning-rate sweep", 1)
    doc = ROOT / "docs" / "smollm2-code-captions-results.md"
    section = (f"## Results ({status})\n\nWritten by `python tools/code_captions_report.py` on "
               f"{datetime.date.today().isoformat()} from the experiment's own `results.md` (rewritten after "
               f"every seed).\n\n{report}\n{sweep_md}\n")
    dtext = doc.read_text()
    dtext = re.sub(r"## Results.*?(?=\n## )", lambda _: section, dtext, count=1, flags=re.S)
    doc.write_text(dtext)
    print(f"wrote README.md and {doc.relative_to(ROOT)}: {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
