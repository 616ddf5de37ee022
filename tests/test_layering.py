"""The package's import graph: no cycles, and no private name imported from another module (a
helper another module needs is public where it lives). Read from the source with ``ast``, imports
inside functions included, so a lazy import cannot hide a cycle.

Also one place per decision (issue 35): the run folder's file names only in ``train/run_folder.py``,
the config importing no op, and the library importing nothing from the training application."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ptpeft_fast"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(modules this one imports, private names it takes from other package modules)."""
    edges, private = set(), []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("ptpeft_fast"):
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            edges.update(subs)
            if len(subs) < len(node.names) and base in modules:
                edges.add(base)  # names defined in the module itself
            private += [(base, a.name) for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__") and f"{base}.{a.name}" not in modules]
    edges.discard(name)
    return edges, private


def _graph():
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items()}


def _cycles(edges: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles({n: e for n, (e, _) in graph.items()})
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = [f"{n} imports {base}.{name}" for n, (_, private) in _graph().items() for base, name in private]
    assert not bad, bad


def test_the_checker_sees_a_cycle_and_a_private_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _graph()
    assert "ptpeft_fast.patch_state" in graph["ptpeft_fast.stages"][0]  # lazy and top-level imports are both read
    assert "ptpeft_fast.train.loop" in graph["ptpeft_fast.train.cli"][0]


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()][0]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_config_imports_no_op():
    """Checking a config registers no op: the activations and backend names are data (op_names)."""
    graph = _graph()
    ops = sorted(m for m in _reachable(graph, "ptpeft_fast.config") if m.startswith("ptpeft_fast.ops"))
    assert not ops, f"ptpeft_fast.config reaches {ops}"


def test_the_library_imports_nothing_from_the_training_application():
    def within(module: str, *packages: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    application = ("ptpeft_fast.train", "ptpeft_fast.data", "ptpeft_fast.metrics", "ptpeft_fast.analyze")
    bad = [f"{n} imports {e}" for n, (edges, _) in _graph().items() if not within(n, *application)
           for e in edges if within(e, "ptpeft_fast.train")]
    assert not bad, bad


def _strings(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings (f-string parts included)."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_the_run_folder_file_names_live_in_one_module():
    from ptpeft_fast.train import run_folder

    names = {run_folder.CONFIG, run_folder.PROGRESS, run_folder.METRICS, run_folder.RESULTS, run_folder.SPECTRUM,
             run_folder.PREDICTIONS,
             run_folder.CHECKPOINTS, run_folder.STATE, run_folder.MANIFEST, run_folder.FULL_MODEL,
             run_folder.TRAINABLE, "trainer.json", "trainer.safetensors", "trainer.pt"}
    own = PACKAGE / "train" / "run_folder.py"
    # analyze.py writes its own report folder (spectrum.png, summary.*), not a run folder
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if path in (own, PACKAGE / "analyze.py"):
            continue
        for value in _strings(ast.parse(path.read_text())):
            if any(value == n or value.endswith("/" + n) for n in names):
                bad.append(f"{path.relative_to(PACKAGE)}: {value!r}")
    assert not bad, bad
