"""docs/training.md's config reference is the config schema (issue 35): every key of the training
config is in the table, every key in the table exists, and a single key's default is the default."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ptpeft_fast.train.config import DEFAULTS

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def _schema_keys() -> set[str]:
    """Dotted keys down to one level inside each section (a dict-valued key is documented whole)."""
    keys = set()
    for section, value in DEFAULTS.items():
        if isinstance(value, dict):
            keys.update(f"{section}.{k}" for k in value)
        else:
            keys.add(section)
    return keys


def _table() -> list[tuple[list[str], str]]:
    """(keys, default cell) per row of the config reference; shorthand expanded: `a.b` / `c` → a.b, a.c,
    and `stageN` → stage1 and stage2."""
    text = DOC.read_text()
    body = text.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys, section = [], None
        for name in re.findall(r"`([^`]+)`", cells[0]):
            if "." in name:
                section, _, leaf = name.partition(".")
            elif section is not None:
                leaf = name
            else:
                section, leaf = name, None
            full = f"{section}.{leaf}" if leaf else section
            keys += [full.replace("stageN", s) for s in ("stage1", "stage2")] if "stageN" in full else [full]
        rows.append((keys, cells[1]))
    return rows


def test_every_config_key_is_documented_and_every_documented_key_exists():
    documented = {k for keys, _ in _table() for k in keys}
    missing = sorted(_schema_keys() - documented)
    assert not missing, f"not in docs/training.md's config reference: {missing}"
    assert not documented - _schema_keys(), f"documented but not config keys: {sorted(documented - _schema_keys())}"


def test_a_single_keys_documented_default_is_the_default():
    checked = 0
    for keys, default in _table():
        values = re.findall(r"`([^`]*)`", default)
        if len(keys) != 1 or len(values) != 1 or keys[0].startswith(("stage1.prefix", "stage2.lora")):
            continue
        section, _, leaf = keys[0].partition(".")
        want = DEFAULTS[section][leaf] if leaf else DEFAULTS[section]
        got = yaml.safe_load(values[0])
        assert got == want, f"{keys[0]}: the docs say {values[0]!r}, the default is {want!r}"
        checked += 1
    assert checked >= 20, checked


def test_the_documented_run_folder_is_the_one_the_code_writes():
    """The tree in docs/training.md and docs/design.md is run_folder.py's own (one place)."""
    import textwrap

    from ptpeft_fast.train import run_folder

    doc = run_folder.__doc__
    start = doc.index("    <output>/")
    tree = textwrap.dedent(doc[start:doc.index("\n\n", start)])
    for name in ("training.md", "design.md"):
        text = (DOC.parent / name).read_text()
        lines = [ln.strip() for ln in text.splitlines()]
        assert all(ln.strip() in lines for ln in tree.splitlines()), f"docs/{name} shows another run folder"
    names = ("CONFIG", "PROGRESS", "METRICS", "RESULTS", "SPECTRUM", "PREDICTIONS", "CHECKPOINTS", "STATE",
             "FULL_MODEL", "TRAINABLE")
    assert all(getattr(run_folder, n) in tree for n in names)


def test_the_readmes_benchmark_figures_come_from_the_reports():
    """Every ratio the README quotes in its benchmark status is in a generated report (issue 35:
    the README said 1.10–1.12× where the report said 0.685×)."""
    root = DOC.parents[1]
    readme = (root / "README.md").read_text()
    status = readme.split("Status from the latest report run", 1)[1].split("On a GPU machine", 1)[0]
    reports = "".join((root / f).read_text() for f in ("BENCHMARKS.md", "docs/benchmarks-smollm2.md",
                                                       "docs/benchmarks-fused-loss.md", "docs/benchmarks-packing.md"))
    figures = re.findall(r"(\d+\.\d{3})×", status)
    assert len(figures) >= 15, figures
    missing = [f for f in figures if f"{f}×" not in reports]
    assert not missing, f"README quotes {missing}, which no benchmark report holds"


def test_every_public_name_is_in_the_readmes_api_table():
    import ptpeft_fast

    readme = (DOC.parents[1] / "README.md").read_text()
    table = readme.split("### The public API", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in ptpeft_fast.__all__ if f"`{n}" not in table]
    assert not missing, f"public but not in the README's API table: {missing}"
    for thing in ("ptpeft-train", "ptpeft-analyze", "PTPEFT_FAST_CACHE", "PTPEFT_FAST_NO_EXT", "PTPEFT_FAST_CPU_ISA"):
        assert thing in table, thing


def test_the_tests_the_docs_cite_exist():
    """A test named in a document is a test of ours (issue 35: kernels.md cited a renamed one)."""
    root = DOC.parents[1]
    defined = set()
    for path in [*root.glob("tests/*.py"), *root.glob("benchmarks/*.py")]:
        defined.update(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
        defined.add(path.stem)
    external = {"test_faketensor"}  # torch.library.opcheck's own sub-test
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "benchmarks").glob("*.md"))]
    cited = {(d.name, n) for d in docs for n in re.findall(r"\b(test_\w*[a-z0-9])\b", d.read_text())}
    missing = sorted((d, n) for d, n in cited if n not in defined and n not in external)
    assert not missing, missing
