"""tools/gen_arch_table.py writes the README's table between its markers, from test results only."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gen_arch_table", ROOT / "tools" / "gen_arch_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_is_replaced_between_markers(tmp_path):
    tool = _tool()
    rows = {"llava": tool.Row(arch="llava", name="LLaVA-1.5", components={"language": ("prefix", "lora")}, train=True,
                              features={"generate": True, "merge": False})}
    meta = {"tests": 3, "failed": 1, "time": 1.0}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tool.README_BEGIN}\nstale table\n{tool.README_END}\noutro\n")
    assert tool.update_readme(readme, rows, meta)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale table" not in text
    line = next(row for row in text.splitlines() if row.startswith("| LLaVA-1.5"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:2] == ["LLaVA-1.5", "`llava`"] and "prefix, LoRA" in cells
    assert tool.FAIL in cells and tool.PASS in cells  # merge failed, generate passed: both shown as measured
    assert "3 test cases" in text and "1 failed" in text
    # the repo's README has the markers, so a run of the tool keeps it current
    assert tool.README_BEGIN in (ROOT / "README.md").read_text()


def test_readme_without_markers_is_left_alone(tmp_path):
    tool = _tool()
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    assert not tool.update_readme(readme, {}, {"tests": 0, "failed": 0, "time": 0})
    assert readme.read_text() == "no table here\n"
