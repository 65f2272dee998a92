"""The README's layout table names every package of avr_megatron/ and every top-level folder, and
nothing that does not exist: a reader finds each concept where the table says."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _table_paths() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {p.rstrip("/") for cell in first_cells for p in re.findall(r"`([^`]+)`", cell)}


def test_layout_table_matches_the_tree():
    listed = _table_paths()
    packages = {f"avr_megatron/{p.name}" for p in (REPO / "avr_megatron").iterdir()
                if (p / "__init__.py").is_file()}
    top = {p.name for p in REPO.iterdir()
           if p.is_dir() and not p.name.startswith(".") and p.name != "avr_megatron"
           and (REPO / ".git").exists() and _tracked(p.name)}
    assert packages <= listed, f"packages missing from README's layout table: {sorted(packages - listed)}"
    assert top <= listed, f"top-level folders missing from README's layout table: {sorted(top - listed)}"
    missing = {p for p in listed if not (REPO / p).exists()}
    assert not missing, f"README's layout table names paths that do not exist: {sorted(missing)}"


def _tracked(name: str) -> bool:
    import subprocess

    out = subprocess.run(["git", "ls-files", "--", name], cwd=REPO, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())
