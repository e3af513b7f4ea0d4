"""Loading models back from the registry, including models registered before the subpackage layout."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from factories import make_model_dir, synthetic_tiles

from geoclip.devtools.services import HOST, free_port
from geoclip.errors import GeoclipError
from geoclip.registry import pyfunc
from geoclip.registry.models import load_served_model, model_input_bands, resolve_model_uri
from geoclip.retries import is_transient

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


@pytest.fixture
def tracking_uri(monkeypatch):
    """Set the tracking URI for one test through MLFLOW_TRACKING_URI (as a user would), one attempt per request."""
    import mlflow

    mlflow.set_tracking_uri(None)  # an earlier test's in-process choice would win over the environment
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an outage fails at once, not after minutes

    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        return uri

    yield use
    mlflow.set_tracking_uri(None)


def test_a_missing_alias_is_told_from_an_unreachable_tracking_server(mlflow_server, tracking_uri):
    tracking_uri(mlflow_server)
    missing = f"models:/no-such-model-{uuid.uuid4().hex[:8]}@champion"
    with pytest.raises(GeoclipError, match="no such registered model alias") as err:
        resolve_model_uri(missing)
    assert str(err.value).startswith(f"{missing}: ") and "geoclip register" in str(err.value)

    down = tracking_uri(f"http://{HOST}:{free_port()}")  # nothing listens there
    for call in (resolve_model_uri, load_served_model, model_input_bands):
        with pytest.raises(GeoclipError) as err:
            call("models:/geoclip@champion")
        msg = str(err.value)
        assert "\n" not in msg and "no such registered model alias" not in msg, (call.__name__, msg)
        assert f"MLflow tracking server {down} is unreachable" in msg and "MLFLOW_TRACKING_URI" in msg, msg
        assert is_transient(err.value), call.__name__  # an outage is worth a retry, a missing alias is not


def test_credentials_in_the_tracking_uri_are_not_echoed(tracking_uri):
    port = free_port()
    tracking_uri(f"http://geoclip:s3cret-pass@{HOST}:{port}")
    with pytest.raises(GeoclipError) as err:
        resolve_model_uri("models:/geoclip@champion")
    assert "s3cret-pass" not in str(err.value)
    assert f"http://geoclip:***@{HOST}:{port}" in str(err.value)
