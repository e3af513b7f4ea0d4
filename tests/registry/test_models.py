"""Loading models back from the registry, including models registered before the subpackage layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from factories import make_model_dir, synthetic_tiles

from geoclip.registry import pyfunc

LOAD = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from factories import synthetic_tiles
{how}
print(model.predict(synthetic_tiles(2))["probabilities"].shape)
"""


def save_as_before_the_layout(model_dir: Path, path: Path) -> Path:
    """Save a pyfunc whose pickled wrapper class names ``geoclip.pyfunc``, as models logged before the layout do."""
    sys.modules["geoclip.pyfunc"] = pyfunc
    pyfunc.GeoclipPyfunc.__module__ = "geoclip.pyfunc"
    try:
        return pyfunc.save_pyfunc(model_dir, synthetic_tiles(2), path)
    finally:
        pyfunc.GeoclipPyfunc.__module__ = "geoclip.registry.pyfunc"
        del sys.modules["geoclip.pyfunc"]


def load_in_fresh_process(how: str) -> subprocess.CompletedProcess:
    """Load and run a model in a new interpreter (nothing aliased or imported beforehand)."""
    code = LOAD.format(tests=str(Path(__file__).parents[1]), how=how)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_model_registered_before_the_subpackage_layout_still_loads(tmp_path):
    old = save_as_before_the_layout(make_model_dir(tmp_path / "model"), tmp_path / "old_pyfunc")
    plain = load_in_fresh_process(f"import geoclip, mlflow\nmodel = mlflow.pyfunc.load_model({str(old)!r})")
    assert plain.returncode != 0 and "geoclip.pyfunc" in plain.stderr  # what the alias is there for
    served = load_in_fresh_process(f"from geoclip.registry.models import load_served_model\n"
                                   f"model = load_served_model({str(old)!r})")
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip().endswith("(2, 10)")
