"""The configs that ship with largeloss: one YAML per dataset, one per method under ``methods/``.

They are package data (pyproject.toml), so an installed largeloss finds them wherever it is installed; a
user's own config file is passed by its path instead (``--config FILE``).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """The file of a shipped config, e.g. ``path("demo.yaml")``, ``path("methods/ll_r.yaml")``."""
    root = Path(str(files(__package__)))
    p = root / name
    if not p.is_file():
        known = sorted(str(q.relative_to(root)) for q in root.rglob("*.yaml"))
        raise FileNotFoundError(f"{name}: no such config in {root}; shipped configs: {', '.join(known)}")
    return p


def method(name: str) -> Path:
    """The shipped config of a training method (``methods/<name>.yaml``)."""
    methods = Path(str(files(__package__))) / "methods"
    p = methods / f"{name}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in methods.glob("*.yaml"))
        raise FileNotFoundError(f"{p}: not found; known methods: {', '.join(known)}")
    return p
