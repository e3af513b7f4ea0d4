"""Loading models back: pin an alias to a version, load the served pyfunc once per process, read its metadata,
or get the GeoCLIP torch module from a model folder or an MLflow URI."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

from geoclip.config import Params
from geoclip.data.s3 import redact
from geoclip.errors import GeoclipError
from geoclip.registry.integrity import verified_copy

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
    """The first line of an exception's message (MLflow's can run to pages), passwords in URIs masked."""
    return redact((str(exc).splitlines() or [type(exc).__name__])[0])


#: MLflow error codes with which the tracking store answers "no such model, version or alias".
_MISSING_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}
#: ... and those with which a server refuses the caller.
_REFUSED_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"}
#: URIs that MLflow resolves through the tracking server (a folder or file:// path does not need one).
_TRACKED_SCHEMES = ("models:/", "runs:/")
_ERRNO = re.compile(r"\[Errno [^\]]*\] [^'\")]*")
_MAX_DETAIL = 200  # characters of MLflow's message kept in ours: enough to tell a 503 from a refused connection


def _store_error(model_uri: str, exc: Exception) -> GeoclipError | None:
    """The error for a tracking store that could not answer (unreachable, failing, refusing); None when it answered.

    MLflow raises one MlflowException type for "no such alias" and for a server that is down: only the error
    code tells them apart (a connection failure carries none, so it reads INTERNAL_ERROR).
    """
    import mlflow

    code = str(getattr(exc, "error_code", "") or "")
    if code in _MISSING_CODES:
        return None
    text = str(exc)
    errno = _ERRNO.search(text)
    detail = errno.group(0).strip() if errno else _first_line(exc)[:_MAX_DETAIL]
    tracking = redact(mlflow.get_tracking_uri())
    if code in _REFUSED_CODES:
        return GeoclipError(f"{model_uri}: the MLflow tracking server {tracking} refused the request ({detail}); "
                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    what = "server" if tracking.startswith(("http://", "https://")) else "store"
    return GeoclipError(f"{model_uri}: MLflow tracking {what} {tracking} is unreachable ({detail}); start it, or set "
                        "MLFLOW_TRACKING_URI to the one that holds the registry")


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
        raise _store_error(model_uri, exc) or GeoclipError(
            f"{model_uri}: no such registered model alias ({_first_line(exc)}); run `geoclip register` first") from exc
    return f"models:/{m.group(1)}/{version.version}"


def _load_error(model_uri: str, exc: Exception) -> GeoclipError:
    """Why a model could not be loaded: its tracking server (for ``models:/``, ``runs:/``) or the model itself."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and model_uri.startswith(_TRACKED_SCHEMES):
        found = _store_error(model_uri, exc)
        if found is not None:
            return found
    return GeoclipError(f"{model_uri}: cannot load the model ({_first_line(exc)})")


def load_served_model(model_uri: str):
    """Load (once per process) the MLflow pyfunc at ``model_uri``, its files first checked against the digest recorded
    at registration (geoclip.registry.integrity)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _alias_moved_modules()
    with _MODELS_LOCK:
        if model_uri not in _MODELS:
            try:
                _MODELS[model_uri] = mlflow.pyfunc.load_model(verified_copy(model_uri))
            except (MlflowException, OSError) as exc:
                raise _load_error(model_uri, exc) from exc
        return _MODELS[model_uri]


def model_input_bands(model_uri: str) -> list[str]:
    """The band names a logged geoclip pyfunc reads, from its MLmodel metadata (the model itself is not loaded)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        meta = get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError) as exc:
        raise _load_error(model_uri, exc) from exc
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
        raise _load_error(source, exc) from exc
    if not hasattr(wrapper, "model"):
        raise GeoclipError(f"{source}: not a geoclip pyfunc (no GeoCLIP inside)")
    return wrapper.model.cpu()
