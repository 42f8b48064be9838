"""The layers of largeloss, checked on the code's actual imports.

``shards`` (the format, writer, readers, loaders) is the bottom layer and imports none of the others.
``ingest`` (dataset adapters -> shards) and ``eval`` (metrics, reports) stand on ``shards`` and do not
import each other. ``train`` stands on ``shards`` and ``eval``; of it, only ``train/demo.py`` may use
``ingest`` (the demo builds its dataset with ``ingest demo``). ``configs`` holds data and imports nothing.

Every ``.py`` file under the five folders is parsed (``ast``), and every import counts: ``import`` and
``from ... import`` at any depth (inside functions too, where imports hide a dependency from a reader of
the module's head), relative ones resolved, and ``importlib.import_module("...")`` / ``__import__("...")``
calls, whose argument must be a string literal: a computed module name cannot be checked and is reported.
The same imports must not form a cycle between modules (a function-level import that closes a cycle
only hides it).
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Iterator, NamedTuple

from conftest import ROOT

PACKAGE = "largeloss"
#: layer (top-level folder) -> the other layers its modules may import
ALLOWED: dict[str, frozenset[str]] = {
    "shards": frozenset(),
    "configs": frozenset(),
    "ingest": frozenset({"shards"}),
    "eval": frozenset({"shards"}),
    "train": frozenset({"shards", "eval", "configs"}),
}
#: single files that may import one more layer than their folder: (file, layer)
EXCEPTIONS = frozenset({
    ("train/demo.py", "ingest"),  # the demo builds its dataset with `ingest demo`
})
#: a module name the checker could not read (a computed import_module / __import__ argument)
DYNAMIC = "<computed module name>"


class Violation(NamedTuple):
    file: str  # relative to the checked root, "/"-separated
    line: int
    module: str  # the imported module, or DYNAMIC

    def __str__(self) -> str:
        layer = self.file.split("/")[0]
        if self.module == DYNAMIC:
            return f"{self.file}:{self.line}: imports a computed module name; name the module literally"
        allowed = ", ".join(sorted(ALLOWED[layer])) or "no other layer"
        return f"{self.file}:{self.line}: imports {self.module}; {layer}/ may import {allowed}"


def layer_of(module: str) -> str | None:
    """The layer a module name belongs to (``largeloss.<layer>...``, or a bare ``<layer>...``), else None."""
    parts = module.split(".")
    if parts[0] == PACKAGE:
        parts = parts[1:]
    return parts[0] if parts and parts[0] in ALLOWED else None


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return name in ("import_module", "__import__")


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in the file ``path`` of the tree ``root``."""
    rel = path.relative_to(root)
    package = ".".join((PACKAGE, *rel.parent.parts))  # the package the file is in, for relative imports
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            seen = set()
            for alias in node.names:
                # ``from largeloss import ingest`` / ``from largeloss.ingest import coco`` name modules
                sub = f"{base}.{alias.name}"
                path_of_sub = root.joinpath(*sub.split(".")[1:])
                is_module = path_of_sub.is_dir() or path_of_sub.with_suffix(".py").is_file()
                module = sub if sub.startswith(PACKAGE + ".") and is_module else base
                if module not in seen:
                    seen.add(module)
                    yield node.lineno, module
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value
            else:
                yield node.lineno, DYNAMIC


def check_layers(root: Path) -> list[Violation]:
    """Every import of a module under ``root``'s layer folders that the layer rules forbid."""
    violations = []
    for layer in sorted(ALLOWED):
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imports_of(path, root):
                if module == DYNAMIC:
                    violations.append(Violation(rel, line, module))
                    continue
                target = layer_of(module)
                if target is None or target == layer or target in ALLOWED[layer] or (rel, target) in EXCEPTIONS:
                    continue
                violations.append(Violation(rel, line, module))
    return violations


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports (any depth, as ``imports_of`` reads them)."""
    files = {}
    for layer in ALLOWED:
        for path in (root / layer).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return {name: {m for _, m in imports_of(path, root) if m in files and m != name} for name, path in files.items()}


def import_cycles(root: Path) -> list[list[str]]:
    """The groups of modules (sorted) that import each other, directly or through others."""
    graph = module_graph(root)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    reach = {m: reachable(m) for m in graph}
    groups = {tuple(sorted(m2 for m2 in reach[m] if m in reach[m2])) for m in graph if m in reach[m]}
    return sorted(list(g) for g in groups)


def test_the_code_keeps_its_layers():
    assert [str(v) for v in check_layers(ROOT)] == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def test_the_checker_reports_each_wrong_import_with_file_and_line(tmp_path: Path):
    _write(tmp_path, "shards/__init__.py", "")
    _write(tmp_path, "shards/format.py", "import json\n")
    _write(tmp_path, "shards/writer.py", """
        from largeloss.ingest.plan import IngestPlan
        from largeloss.shards.format import Record


        def later():
            import largeloss.train.loop  # hidden inside a function
        """)
    _write(tmp_path, "ingest/plan.py", "")
    _write(tmp_path, "ingest/coco.py", "")
    _write(tmp_path, "ingest/cli.py", """
        import importlib
        from importlib import import_module

        from . import coco
        from ..shards import format

        ADAPTER = importlib.import_module("largeloss.eval.report")
        name = "largeloss.ingest.coco"
        mod = import_module(name)
        """)
    _write(tmp_path, "eval/report.py", "from ..train import model\n")
    _write(tmp_path, "train/model.py", "from largeloss import shards, eval\n")
    _write(tmp_path, "train/demo.py", "from largeloss.ingest.cli import main\n")  # the one allowed exception
    _write(tmp_path, "train/features.py", "from largeloss.ingest import coco\nimport ingest.cli\n")
    _write(tmp_path, "configs/__init__.py", "from largeloss.shards import format\n")

    found = check_layers(tmp_path)
    assert found == [
        Violation("configs/__init__.py", 1, "largeloss.shards.format"),
        Violation("eval/report.py", 1, "largeloss.train.model"),  # train/model.py is a module: named precisely
        Violation("ingest/cli.py", 7, "largeloss.eval.report"),
        Violation("ingest/cli.py", 9, DYNAMIC),
        Violation("shards/writer.py", 1, "largeloss.ingest.plan"),
        Violation("shards/writer.py", 6, "largeloss.train.loop"),
        Violation("train/features.py", 1, "largeloss.ingest.coco"),
        Violation("train/features.py", 2, "ingest.cli"),
    ]
    assert str(found[4]) == "shards/writer.py:1: imports largeloss.ingest.plan; shards/ may import no other layer"
    assert str(found[3]) == "ingest/cli.py:9: imports a computed module name; name the module literally"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path):
    _write(tmp_path, "ingest/cli.py", "from largeloss.ingest import demo\n")
    _write(tmp_path, "ingest/demo.py", """
        def add_arguments(parser):
            from largeloss.ingest.cli import positive_int
        """)
    _write(tmp_path, "ingest/voc.py", "from largeloss.shards import format\n")
    _write(tmp_path, "shards/format.py", "")
    assert import_cycles(tmp_path) == [["largeloss.ingest.cli", "largeloss.ingest.demo"]]
