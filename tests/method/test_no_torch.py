"""The method core must stay importable (and testable in milliseconds) without torch."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import avr_megatron.method as method

MODULES = sorted(m.name for m in pkgutil.iter_modules(method.__path__))
HEAVY = ("torch", "numpy", "transformers", "megatron", "vllm", "datasets", "pyarrow")


def test_every_module_is_listed():
    assert {"chat", "prompts", "ratings", "tree", "rewards", "filters", "requests", "stage1", "search",
            "thoughts", "stage2", "records", "summary"} <= set(MODULES)


def test_no_module_imports_heavy_packages_in_source():
    for path in Path(method.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"


def test_importing_every_module_leaves_torch_unloaded():
    code = (
        "import sys\n"
        + "".join(f"import avr_megatron.method.{m}\n" for m in MODULES)
        + f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    root = Path(method.__path__[0]).parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root)}, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_package_init_is_only_a_docstring():
    tree = ast.parse(Path(method.__file__).read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0].value, ast.Constant)
