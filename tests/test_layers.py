"""The import layering of docs/architecture.md, checked over the source: a module imports only from its own layer
or the layers below it, at module level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

from conftest import REPO

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("base", ("ft_dist", "ft_dist.errors", "ft_dist.atomic_io", "ft_dist.hooks", "ft_dist.runtime", "ft_dist.dist",
              "ft_dist.settings", "ft_dist.phase_memory")),
    ("config", ("ft_dist.config", "ft_dist.data.schema", "ft_dist.eval.schema", "ft_dist.planner.schema",
                "ft_dist.cluster.schema")),
    ("components", ("ft_dist.loss", "ft_dist.activations")),
    ("cluster", ("ft_dist.cluster",)),
    ("planner", ("ft_dist.planner",)),
    ("data", ("ft_dist.data",)),
    ("model", ("ft_dist.models", "ft_dist.hf_weights", "ft_dist.optim", "ft_dist.flops")),
    ("strategy", ("ft_dist.strategies",)),
    ("checkpoint/metrics", ("ft_dist.checkpoint", "ft_dist.tracking")),
    ("eval", ("ft_dist.eval",)),
    ("loop", ("ft_dist.loop", "ft_dist.watchdog", "ft_dist.dry_run")),
    ("generate", ("ft_dist.generate",)),
    ("commands", ("ft_dist.commands",)),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 1, -1):  # the package root itself matches only itself
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    if module == "ft_dist":
        return RANK["ft_dist"]
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")


def imports(path: Path, package_root: Path) -> Iterator[Tuple[str, str, int]]:
    """(importing module, imported ft_dist module, line) for every import of ft_dist in the file."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ft_dist":
            for alias in node.names:  # `from ft_dist import dist` imports the module ft_dist.dist
                sub = f"{node.module}.{alias.name}"
                is_module = (package_root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (package_root.parent / Path(*sub.split("."))).is_dir()
                yield module, sub if is_module else node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ft_dist":
                    yield module, alias.name, node.lineno


def violations(package_root: Path) -> List[str]:
    found = []
    for path in sorted(package_root.rglob("*.py")):
        for importer, imported, line in imports(path, package_root):
            if layer_of(imported) > layer_of(importer):
                found.append(f"{path.relative_to(package_root.parent)}:{line}: {importer} ({LAYERS[layer_of(importer)][0]}) "
                             f"imports {imported} ({LAYERS[layer_of(imported)][0]})")
    return found


def test_no_layer_imports_a_higher_one():
    assert violations(REPO / "ft_dist") == []


def test_the_check_catches_an_upward_import(tmp_path):
    # The same check over a copy of the package with the import the layering forbids most: eval -> a command.
    import shutil

    copy = tmp_path / "ft_dist"
    shutil.copytree(REPO / "ft_dist", copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    target = copy / "eval" / "generation.py"
    target.write_text(target.read_text() + "\nfrom ft_dist.commands.train import run  # noqa\n")
    data = copy / "data" / "prepare.py"
    data.write_text(data.read_text() + "\nfrom ft_dist.loop import train_loop  # noqa\n")
    found = violations(copy)
    assert len(found) == 2, found
    assert "ft_dist.data.prepare (data) imports ft_dist.loop (loop)" in found[0]
    assert "ft_dist.eval.generation (eval) imports ft_dist.commands.train (commands)" in found[1]


def test_entry_points_live_in_the_commands_layer():
    """Every console script and every `python -m` module is a command; library packages hold none."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # tomllib is 3.11+; this table is flat
    targets = [line.split("=", 1)[1].strip().strip('"') for line in section.splitlines() if "=" in line]
    assert len(targets) == 8 and all(t.startswith("ft_dist.commands") for t in targets), targets
    runnable = [str(p.relative_to(REPO)) for p in (REPO / "ft_dist").rglob("*.py")
                if "__main__" in p.read_text() and "commands" not in p.parts]
    assert runnable == []
