"""The package declares what it imports, and importing it changes nothing in the process."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "traduire"
# Import names whose distribution is called something else.
DISTRIBUTIONS = {"yaml": "pyyaml"}
# Imported only inside the function that needs them, for an optional extra.
OPTIONAL = {"ctranslate2": "ctranslate2", "matplotlib": "plot", "tensorboard": "tensorboard",
            "transformers": "hf"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirement_names(requirements: list[str]) -> dict[str, str]:
    """{distribution name: version specifier} of requirement strings like 'torch>=2.6'."""
    found = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement.split(";")[0])
        found[match.group(1).lower()] = match.group(2).split("#")[0].strip()
    return found


def third_party_imports() -> set[str]:
    """Top-level names of every module imported anywhere in the package."""
    names: set[str] = set()
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "traduire"}


def test_every_import_is_a_declared_dependency():
    required = requirement_names(project()["dependencies"])
    extras = project()["optional-dependencies"]
    for name in sorted(third_party_imports()):
        distribution = DISTRIBUTIONS.get(name, name)
        if name in OPTIONAL:
            assert OPTIONAL[name] in extras, f"{name}: no extra '{OPTIONAL[name]}'"
            continue
        assert distribution in required, f"{name} is imported but not a dependency"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_installed_versions_meet_the_declared_lower_bounds():
    for distribution, specifier in requirement_names(project()["dependencies"]).items():
        bound = re.search(r">=\s*([\d.]+)", specifier)
        assert bound, f"{distribution}: give a lower bound"
        installed = importlib.metadata.version(distribution)
        assert version_tuple(installed) >= version_tuple(bound.group(1)), distribution


@pytest.mark.parametrize("name", [
    "datasets.List", "datasets.Dataset.from_generator", "torch.nn.utils.get_total_norm",
    "torch.nn.utils.clip_grads_with_norm_", "pyarrow.compute.list_flatten",
    "pyarrow.compute.list_value_length", "sacrebleu.metrics.CHRF",
    "sentencepiece.SentencePieceTrainer.train"])
def test_the_newest_names_the_code_needs_exist(name):
    """The lower bounds above were chosen for these: the newest APIs traduire calls."""
    module_name, _, attribute = name.rpartition(".")
    while module_name:
        try:
            owner = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:
            module_name, _, parent = module_name.rpartition(".")
            attribute = f"{parent}.{attribute}"
    for part in attribute.split("."):
        owner = getattr(owner, part)
    assert owner is not None


def test_importing_traduire_changes_nothing_in_the_process():
    """Importing every module leaves the environment and the allocator alone; the command
    line (or configure_runtime) applies the settings."""
    probe = """
import os, sys
before = dict(os.environ)
import traduire
from traduire import analysis, cli, export, pipeline, report, training, translate
from traduire import translate_files
assert dict(os.environ) == before, set(os.environ) ^ set(before)
assert "torch" in sys.modules
traduire.configure_runtime()
assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16384"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("module", ["traduire", "traduire.cli"])
def test_import_loads_no_heavy_module(module):
    """`import traduire` is free, and `traduire --help` does not wait for torch."""
    result = subprocess.run([sys.executable, "-c", f"import sys, {module}; print("
                             "sorted(m for m in ('torch', 'datasets', 'sentencepiece') "
                             "if m in sys.modules))"], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def imports_of(path: Path) -> set[str]:
    """traduire modules a module imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING"
               for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "traduire":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("traduire."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("traduire."))
    return found - {path.stem}


# The layers, top to bottom: a module may import only from its own layer or those below,
# and nothing may form a cycle.
LAYERS = [
    {"cli", "__main__"},
    {"pipeline", "export", "report", "translate_files", "huggingface", "translate_chunks",
     "translate_output"},
    {"translate"},
    {"analysis", "training", "ctranslate2_engine"},
    {"evaluate", "monitor", "loading", "finetune"},
    {"search", "data", "tokenizer", "checkpoint", "distributed", "bible", "schedule"},
    {"model", "batch", "loss"},
    {"config", "device"},
    {"kernels", "files", "errors", "runtime"},
]


def test_modules_import_downwards_only_and_without_cycles():
    modules = {p.stem for p in SOURCE.glob("*.py")} - {"__init__"}
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    assert modules == set(layer_of), f"place {modules ^ set(layer_of)} in LAYERS"
    graph = {m: imports_of(SOURCE / f"{m}.py") & modules for m in modules}
    for module, imported in graph.items():
        for other in imported:
            assert layer_of[other] >= layer_of[module], f"{module} imports {other}"
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for other in graph[module]:
            visit(other, path + [module])
        state[module] = 2

    for module in sorted(modules):
        visit(module, [])
