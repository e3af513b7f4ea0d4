"""Loading models back: pin an alias to a version, load the served pyfunc once per process, read its metadata,
or get the GeoCLIP torch module from a model folder or an MLflow URI."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

from geoclip.config import Params
from geoclip.errors import GeoclipError

_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


#: Where models registered before the subpackage layout pickled their wrapper class, and where it lives now.
_MOVED_MODULES = {"geoclip.pyfunc": "geoclip.registry.pyfunc"}


def _alias_moved_modules() -> None:
    """Let models registered before the subpackage layout load: their pickled wrapper names ``geoclip.pyfunc``."""
    import importlib

    for old, new in _MOVED_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (MLflow's can run to pages)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def resolve_model_uri(model_uri: str) -> str:
    """Pin ``models:/name@alias`` to ``models:/name/<version>`` so every scene of a run uses the same model."""
    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model_uri)
    if not m:
        return model_uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(m.group(1), m.group(2))
    except MlflowException as exc:
        raise GeoclipError(f"{model_uri}: no such registered model alias ({exc.message.splitlines()[0]}); "
                           "run `geoclip register` first") from exc
    return f"models:/{m.group(1)}/{version.version}"


def load_served_model(model_uri: str):
    """Load (once per process) the MLflow pyfunc at ``model_uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _alias_moved_modules()
    with _MODELS_LOCK:
        if model_uri not in _MODELS:
            try:
                _MODELS[model_uri] = mlflow.pyfunc.load_model(model_uri)
            except (MlflowException, OSError) as exc:
                raise GeoclipError(f"{model_uri}: cannot load the model ({_first_line(exc)})") from exc
        return _MODELS[model_uri]


def model_input_bands(model_uri: str) -> list[str]:
    """The band names a logged geoclip pyfunc reads, from its MLmodel metadata (the model itself is not loaded)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        meta = get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError) as exc:
        raise GeoclipError(f"{model_uri}: cannot load the model ({_first_line(exc)})") from exc
    if not meta.get("input_band_names"):
        raise GeoclipError(f"{model_uri}: no input_band_names in its metadata; expected a model logged by "
                           "geoclip.registry.pyfunc")
    return list(meta["input_band_names"])


def load_geoclip(model_uri_or_dir: str | Path, params: Params):
    """A GeoCLIP torch module from a model folder (``save_model``) or an MLflow URI (``models:/geoclip@champion``)."""
    from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE, load_model

    source = str(model_uri_or_dir)
    if "://" not in source and ":/" not in source:
        folder = Path(source)
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise GeoclipError(f"{folder}: no {WEIGHTS_FILE} + {CONFIG_FILE}; expected a model folder "
                               f"written by `geoclip train` or an MLflow URI like models:/geoclip@champion")
        return load_model(folder)
    import mlflow
    from mlflow.exceptions import MlflowException

    from geoclip.registry.tracking import configure

    configure(params)
    _alias_moved_modules()
    try:
        wrapper = mlflow.pyfunc.load_model(source).unwrap_python_model()
    except (MlflowException, OSError) as exc:
        raise GeoclipError(f"{source}: cannot load the model ({_first_line(exc)})") from exc
    if not hasattr(wrapper, "model"):
        raise GeoclipError(f"{source}: not a geoclip pyfunc (no GeoCLIP inside)")
    return wrapper.model.cpu()
