"""The package's floors: a module imports only from its own floor or the floors below it
(docs/development.md's layout; ../shared/DESIGN.md), lazy imports inside functions included."""

import ast
from pathlib import Path

import fedasr

ROOT = Path(fedasr.__file__).parent

# lowest first; a name is a top-level module or package of fedasr
FLOORS = [
    {"errors", "fsutil", "codec", "configlib", "config", "hostsync", "__init__", "__main__"},
    {"data", "model", "rundir"},
    {"trainer", "checkpoint", "evaluate", "export", "int8"},
    {"aggregate", "prune"},
    {"methods"},
    {"fl"},
    {"commands", "sweep"},
    {"cli"},
]


def floor(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module}: on no floor (add it to FLOORS and docs/development.md's layout)")


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedasr":
            if node.module == "fedasr":  # a submodule, or a name of the package itself
                yield from ((node.lineno, f"fedasr.{a.name}" if (ROOT / a.name).exists() or
                             (ROOT / f"{a.name}.py").exists() else "fedasr") for a in node.names)
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fedasr")


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        own = floor(module)
        for line, target in imports(path):
            if floor(target) > own:
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_the_floor_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedasr.fl.runner import Runner\n")
    assert [(line, t) for line, t in imports(bad)] == [(2, "fedasr.fl.runner")]
    assert floor("fedasr.fl.runner") > floor("fedasr.model.compact")
