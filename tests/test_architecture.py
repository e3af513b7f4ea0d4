"""The architecture contracts in pyproject.toml hold (import-linter), and they do catch what they forbid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the project at ``root`` (its pyproject.toml contracts, its own geoclip/ and flows/)."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS}: not installed; import-linter is in requirements.lock (run `make venv`)")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)})


def test_the_project_keeps_every_contract():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the library, the flows and the contracts to break."""
    for name in ("geoclip", "flows"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("geoclip/model/loss.py", "import mlflow", "model and training code never import MLflow"),
    ("geoclip/training/checkpoint.py", "from geoclip.data import s3", "model and training code never import"),
    ("geoclip/data/tiles.py", "from geoclip.model import clip", "geoclip is layered"),
    ("geoclip/registry/export.py", "from geoclip.scoring import score", "geoclip is layered"),
    ("geoclip/scoring/blend.py", "from prefect import task", "the library never imports Prefect"),
    ("geoclip/data/tiles.py", "from geoclip.data import prepare", "no import cycles"),
])
def test_a_forbidden_import_breaks_its_contract(copy: Path, module: str, line: str, contract: str):
    with open(copy / module, "a") as f:
        f.write(f"\n{line}  # added by the test\n")
    done = lint_imports(copy)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout[-4000:]
