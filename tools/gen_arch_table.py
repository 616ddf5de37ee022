"""Generate the verified-architecture table (docs/architectures.md) from test results.

The table only says what the tests showed: each cell comes from one test case of
``tests/test_families.py`` (read from pytest's junit XML, where every case records its
architecture, feature and components as properties). A failing case shows ✗, an absent
one —; nothing is claimed from the architecture table alone.

    python tools/gen_arch_table.py                      # run the tests, write docs/architectures.md
    python tools/gen_arch_table.py --junit results.xml  # from an existing run
                                                        # (pytest -o junit_family=xunit1 --junitxml=...)
    python tools/gen_arch_table.py --stdout             # print instead of writing
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = "tests/test_families.py"
COMPONENTS = ("vision", "qformer", "projector", "language")
# feature key recorded by the tests -> column title
FEATURES = OrderedDict([
    ("identity", "identity init"),
    ("generate", "generate (batched, left-padded)"),
    ("merge", "merge"),
    ("save_load", "save/load"),
    ("sliding_window", "sliding window: prefix visible"),
    ("mrope", "M-RoPE positions kept"),
    ("positions_shift", "positions=\"shift\""),
    ("train_cli", "two-stage `ptpeft_fast.train`"),
])
METHOD_NAMES = {"prefix": "prefix", "lora": "LoRA", "adapter": "Adapter"}
PASS, FAIL, NA = "✓", "✗", "—"
LEGEND = """\
What each column checks, on a tiny randomly initialised model built from a config and loaded
through `save_pretrained`/`from_pretrained`:

- **vision / qformer / projector / language**: the methods patched into that component in the
  gradient test. *train: gradients*: with prefix + LoRA + Adapter in every listed component,
  stage `peft` gives nonzero gradients to exactly the prefix/LoRA/Adapter parameters and stage
  `prefix` to exactly the prefix parameters; no base weight gets one.
- **identity init**: LoRA (B = 0) and adapters (up = 0) everywhere, no prefix: logits equal the
  unpatched model's.
- **generate**: greedy `generate` with prefixes (and LoRA) on a batch of two left-padded rows of
  different lengths (with images for image-text models) equals step-by-step argmax of full
  forward passes.
- **merge**: `merge` (LoRA folded, prefix MLPs made static) keeps the logits (fp32, ≤ 1e-5 relative).
- **save/load**: `save` then `load` into a fresh model gives identical logits.
- **sliding window**: in sliding-window layers the window still limits the real keys and every
  query, also beyond the window, sees the whole prefix (float64 reference).
- **M-RoPE**: the 3-D rotary positions the model computes are unchanged by the prefix, and the
  prefix keys reach attention unrotated.
- **positions="shift"**: the language model's rotary embedding receives the positions of
  `positions="keep"` plus P (PEFT's convention).
- **two-stage `ptpeft_fast.train`**: the train CLI, with `model.name` a local folder holding a
  tiny model of the family and its real processor (text-only families: its tokenizer), runs
  stage 1 (prefix in every prefix component) and stage 2 (LoRA in every component) on synthetic
  VQA (`synthetic-shapes`; text-only families: `synthetic-text`, the scene's caption in the
  prompt); the training loss falls in each stage, the final evaluation (generate + spectrum)
  runs, and the stage-2 checkpoint holds the prefix and LoRA weights of each component."""


@dataclass
class Row:
    """Everything the tests said about one architecture."""

    arch: str
    name: str = ""
    notes: str = ""
    components: dict[str, tuple[str, ...]] = field(default_factory=dict)
    train: bool | None = None  # the gradient test (covers every component x method listed)
    features: dict[str, bool] = field(default_factory=dict)
    softcap: bool = False
    failures: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> the test's skip reason


def run_tests(junit: Path, extra: list[str]) -> int:
    """Run the family tests, writing junit XML (xunit1 keeps the recorded properties)."""
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={junit}", *extra]
    print("running:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=ROOT)


def parse(junit: Path) -> tuple[dict[str, Row], dict[str, str]]:
    """Rows by architecture id, plus run metadata (tests, failures, time)."""
    tree = ET.parse(junit)
    rows: dict[str, Row] = OrderedDict()
    meta = {"tests": 0, "failed": 0, "time": 0.0}
    for suite in tree.iter("testsuite"):
        meta["time"] += float(suite.get("time", 0) or 0)
    for case in tree.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "arch" not in props:
            continue
        meta["tests"] += 1
        bad = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        meta["failed"] += int(bad)
        row = rows.setdefault(props["arch"], Row(props["arch"]))
        row.name = props.get("name", row.name) or row.arch
        row.notes = props.get("notes", row.notes)
        feature = props.get("feature")
        if skipped:
            reason = case.find("skipped").get("message", "") or ""
            row.skipped[feature or "?"] = reason.split(": ", 1)[-1] if reason.startswith("Skipped") else reason
            continue
        if bad:
            row.failures.append(case.get("name", feature or "?"))
        if feature == "train":
            row.train = not bad
            for part in (props.get("components") or "").split(";"):
                if "=" in part:
                    comp, methods = part.split("=", 1)
                    row.components[comp] = tuple(m for m in methods.split("+") if m)
        elif feature:
            row.features[feature] = not bad
            if feature == "sliding_window" and props.get("softcap") and not bad:
                row.softcap = True
    return rows, meta


def _component_cell(row: Row, comp: str) -> str:
    if comp not in row.components:
        return NA
    methods = ", ".join(METHOD_NAMES.get(m, m) for m in row.components[comp])
    if row.train is None:
        return f"{methods} (untested)"
    return methods if row.train else f"{FAIL} {methods}"


def _feature_cell(row: Row, feature: str) -> str:
    if feature not in row.features:
        return NA
    return PASS if row.features[feature] else FAIL


README_BEGIN = "<!-- arch-table:begin (generated by tools/gen_arch_table.py; do not edit) -->"
README_END = "<!-- arch-table:end -->"


def _table(rows: dict[str, Row], with_notes: bool) -> list[str]:
    head = ["Architecture", "model_type", *COMPONENTS, "train: gradients", *FEATURES.values()]
    head += ["notes"] if with_notes else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows.values():
        cells = [row.name, f"`{row.arch}`", *(_component_cell(row, c) for c in COMPONENTS),
                 PASS if row.train else (FAIL if row.train is False else NA),
                 *(_feature_cell(row, f) for f in FEATURES)]
        if with_notes:
            cells.append("; ".join(_notes(row)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(row: Row) -> list[str]:
    notes = []
    if row.softcap:
        notes.append("attention logit soft-capping honoured (tested)")
    if row.notes:
        notes.append(row.notes)
    for feature, reason in row.skipped.items():
        notes.append(f"{FEATURES.get(feature, feature)} not verified: {reason}")
    if row.failures:
        notes.append("failing: " + ", ".join(f"`{f}`" for f in row.failures))
    return notes


def update_readme(readme: Path, rows: dict[str, Row], meta: dict) -> bool:
    """Replace the README's table between the arch-table markers (notes and legend stay in
    docs/architectures.md); False when the README has no markers."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return False
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    summary = (f"{meta['tests']} test cases of `tests/test_families.py`, {meta['failed']} failed "
               f"({_dt.date.today().isoformat()}); {PASS} passed, {FAIL} failed, {NA} not applicable / not tested.")
    block = "\n".join([README_BEGIN, summary, "", *_table(rows, with_notes=False), README_END])
    readme.write_text(before + block + after, encoding="utf-8")
    return True


def render(rows: dict[str, Row], meta: dict, source: str) -> str:
    """The markdown page."""
    import torch
    import transformers

    lines = [
        "# Verified architectures",
        "",
        ("Generated by `tools/gen_arch_table.py` from the results of `tests/test_families.py`; "
         f"do not edit by hand. A cell says only what a test showed: {PASS} passed, {FAIL} failed, "
         f"{NA} not applicable / not tested."),
        "",
        (f"Run: {meta['tests']} test cases, {meta['failed']} failed, {meta['time']:.0f} s "
         f"(transformers {transformers.__version__}, torch {torch.__version__}, {source}, "
         f"{_dt.date.today().isoformat()})."),
        "",
        *LEGEND.splitlines(),
        "",
        *_table(rows, with_notes=True),
    ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--junit", type=Path, help="junit XML of a run of tests/test_families.py (xunit1 family)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures.md")
    ap.add_argument("--stdout", action="store_true", help="print the page instead of writing --out")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md",
                    help="README whose table between the arch-table markers is replaced (with --out)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments when the tests are run")
    args = ap.parse_args(argv)
    if args.junit is None:
        tmp = Path(tempfile.mkdtemp(prefix="arch_table_")) / "junit.xml"
        run_tests(tmp, args.pytest_args)
        junit, source = tmp, "fresh run"
    else:
        junit, source = args.junit, f"from {os.path.basename(args.junit)}"
    if not junit.is_file():
        print(f"{junit}: no junit XML (did pytest run?)", file=sys.stderr)
        return 2
    rows, meta = parse(junit)
    if not rows:
        print(f"{junit}: no test case recorded an 'arch' property; was it run with -o junit_family=xunit1?",
              file=sys.stderr)
        return 2
    page = render(rows, meta, source)
    if args.stdout:
        print(page)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page)
        print(f"wrote {args.out} ({len(rows)} architectures, {meta['failed']} failing cases)", file=sys.stderr)
        if update_readme(args.readme, rows, meta):
            print(f"updated the table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
