"""The MLflow model registry's aliases: the promotion gate, manual promote, rollback and a listing.

Every move of the ``champion`` alias (by ``register``, ``promote`` or ``rollback``) happens under the model's alias
lock (geoclip.registry.lock) and goes through ``set_champion``, which keeps the registered-model tag
``champion_history``: a JSON list of the versions that held the alias, oldest first, the current champion last.
``rollback`` pops the current champion and gives the alias back to the entry before it, so promote-then-rollback and
register-then-rollback both undo.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from geoclip.config import Params, RegisterConfig
from geoclip.errors import GeoclipError
from geoclip.registry.lock import alias_lock

HISTORY_TAG = "champion_history"
HISTORY_LIMIT = 100  # older entries are dropped: a rollback goes back at most this far
HOLDOUT_TAG = "holdout_class"
NOTE_TAG = "champion_note"  # on a version: how and when it last became champion
_EPS = 1e-9  # metric differences closer to the margin than this count as equal to it (float noise)


def client_for(params: Params) -> MlflowClient:
    """A registry client for the configured tracking server (the environment's URI wins, as everywhere)."""
    return MlflowClient(params.mlflow.resolved_tracking_uri())


def _missing(exc: MlflowException) -> bool:
    """Whether MLflow says the model or version does not exist."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The model version holding ``alias``, or None (also when the model does not exist yet)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # A missing alias is INVALID_PARAMETER_VALUE; other failures (server down) must not read as "no champion".
        if _missing(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise


def metric_value(version: ModelVersion, metric: str) -> float:
    """A version's metric from its tags (``<metric>`` or ``metric.<metric>``); -inf when missing."""
    for key in (metric, f"metric.{metric}"):
        try:
            value = float(version.tags[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return -math.inf


def decide(metric: str, value: float, margin: float, champion: ModelVersion | None,
           holdout: str = "") -> tuple[bool, str]:
    """The gate: (becomes champion?, why). Champion only when ``value`` beats the champion's by more than ``margin``."""
    if holdout:
        return False, f"trained with train.holdout_class {holdout!r} (unseen-class experiment): never champion"
    if champion is None:
        return True, f"no champion yet: {metric} {value:.6g} makes the first champion"
    best = metric_value(champion, metric)
    if not math.isfinite(best):
        return True, f"champion v{champion.version} has no {metric} tag: {metric} {value:.6g} replaces it"
    gain = value - best
    if gain > margin and not math.isclose(gain, margin, abs_tol=_EPS):
        return True, (f"{metric} {value:.6g} beats champion v{champion.version}'s {best:.6g} by {gain:.6g}, "
                      f"more than margin {margin:g}")
    return False, (f"{metric} {value:.6g} does not beat champion v{champion.version}'s {best:.6g} "
                   f"by more than margin {margin:g}")


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """The versions that held ``champion``, oldest first (empty when none was recorded)."""
    try:
        raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise GeoclipError(f"model {name!r}: not in the registry; run `geoclip register` first") from None
    try:
        history = json.loads(raw)
    except json.JSONDecodeError:
        raise GeoclipError(f"model {name!r}: tag {HISTORY_TAG} is {raw[:80]!r}; expected a JSON list of versions")
    if not isinstance(history, list):
        raise GeoclipError(f"model {name!r}: tag {HISTORY_TAG} is {raw[:80]!r}; expected a JSON list of versions")
    return [str(v) for v in history]


def _now() -> str:
    """UTC time as ISO 8601 (seconds), for notes on versions."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_champion(client: MlflowClient, cfg: RegisterConfig, version: str, how: str) -> str | None:
    """Give ``version`` the champion alias and record it in the history; return the previous champion's version."""
    name = cfg.model_name
    old = alias_version(client, name, cfg.champion_alias)
    old_version = None if old is None else str(old.version)
    history = champion_history(client, name)
    # A champion set outside geoclip (UI, older releases) joins the history first, so a rollback reaches it.
    if old_version is not None and (not history or history[-1] != old_version):
        history.append(old_version)
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_alias(name, cfg.champion_alias, version)
    challenger = alias_version(client, name, cfg.challenger_alias)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, cfg.challenger_alias)  # it no longer challenges anyone
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))
    was = "none" if old_version is None else f"v{old_version}"
    client.set_model_version_tag(name, version, NOTE_TAG, f"{how} at {_now()} (champion was {was})")
    return old_version


def gate_version(client: MlflowClient, cfg: RegisterConfig, version: str, value: float, holdout: str = "") -> dict:
    """Apply the gate to a registered ``version`` with metric ``value``: set champion or challenger; say why.

    Under the model's alias lock: two registrations at the same moment never both compare with the same champion.
    """
    with alias_lock(client, cfg.model_name):
        return _gate_locked(client, cfg, version, value, holdout)


def _gate_locked(client: MlflowClient, cfg: RegisterConfig, version: str, value: float, holdout: str) -> dict:
    """The body of :func:`gate_version`, run while holding the alias lock."""
    champion = alias_version(client, cfg.model_name, cfg.champion_alias)
    wins, reason = decide(cfg.metric, value, cfg.margin, champion, holdout)
    previous = {"previous_champion_version": None if champion is None else str(champion.version),
                "previous_champion_value": None}
    if champion is not None and math.isfinite(metric_value(champion, cfg.metric)):  # JSON has no -Infinity
        previous["previous_champion_value"] = metric_value(champion, cfg.metric)
    if wins:
        set_champion(client, cfg, version, f"champion by the gate ({reason})")
        alias, champion_version = cfg.champion_alias, version
    else:
        client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, version)
        alias, champion_version = cfg.challenger_alias, previous["previous_champion_version"]
    client.set_model_version_tag(cfg.model_name, version, "gate", f"{alias}: {reason}")
    return {"alias": alias, "reason": reason, "champion_version": champion_version, **previous}


def live_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """The model version ``version`` of ``name``; a one-line GeoclipError when it is unknown or deleted."""
    if not str(version).isdigit() or int(version) < 1:
        raise GeoclipError(f"model {name!r}: version {version!r} is not a version number (1, 2, ...)")
    try:
        return client.get_model_version(name, str(int(version)))
    except MlflowException as exc:
        if not _missing(exc):
            raise
    try:
        live = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except MlflowException as exc:
        raise GeoclipError(f"model {name!r}: not in the registry ({str(exc).splitlines()[0]})") from None
    if not live:
        raise GeoclipError(f"model {name!r}: no registered versions; run `geoclip register` first")
    # MLflow never reuses a version number: a number below the highest one that is gone was deleted.
    state = "was deleted" if int(version) < live[-1] else "does not exist"
    raise GeoclipError(f"model {name!r}: version {version} {state} (versions: {', '.join(map(str, live))})")


def promote(params: Params, version: str, force: bool = False) -> dict:
    """Move ``champion`` to ``version`` (a person's decision); refuse unseen-class models unless ``force``."""
    cfg, client = params.register, client_for(params)
    target = live_version(client, cfg.model_name, version)
    new = str(target.version)
    holdout = target.tags.get(HOLDOUT_TAG, "")
    if holdout and not force:
        raise GeoclipError(f"model {cfg.model_name!r}: version {new} was trained without class {holdout!r} "
                           "(unseen-class experiment); pass --force to make it champion anyway")
    with alias_lock(client, cfg.model_name):
        current = alias_version(client, cfg.model_name, cfg.champion_alias)
        if current is not None and str(current.version) == new:
            return {"name": cfg.model_name, "action": "promote", "old": new, "new": new, "changed": False}
        old = set_champion(client, cfg, new, "promoted by `geoclip registry promote`")
    return {"name": cfg.model_name, "action": "promote", "old": old, "new": new, "changed": True}


def rollback(params: Params) -> dict:
    """Give ``champion`` back to the version that held it before the current one (skipping deleted versions)."""
    cfg, client = params.register, client_for(params)
    with alias_lock(client, cfg.model_name):
        return _rollback_locked(client, cfg)


def _rollback_locked(client: MlflowClient, cfg: RegisterConfig) -> dict:
    """The body of :func:`rollback`, run while holding the alias lock."""
    name = cfg.model_name
    current = alias_version(client, name, cfg.champion_alias)
    current_version = None if current is None else str(current.version)
    history = champion_history(client, name)
    while history and history[-1] == current_version:
        history.pop()
    skipped = []
    while history:
        try:
            live_version(client, name, history[-1])
            break
        except GeoclipError:
            skipped.append(history.pop())
    if not history:
        raise GeoclipError(f"model {name!r}: no previous champion to roll back to (champion: "
                           f"{'none' if current_version is None else 'v' + current_version}, "
                           f"history tag {HISTORY_TAG} has no earlier live version)")
    target = history[-1]
    client.set_registered_model_alias(name, cfg.champion_alias, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    was = "none" if current_version is None else f"v{current_version}"
    client.set_model_version_tag(name, target, NOTE_TAG,
                                 f"restored by `geoclip registry rollback` at {_now()} (champion was {was})")
    return {"name": name, "action": "rollback", "old": current_version, "new": target, "changed": True,
            "skipped_deleted": skipped}


def list_versions(params: Params) -> list[dict]:
    """Every live version, newest first: aliases, the promotion metric, run, holdout class and the gate's note."""
    cfg, client = params.register, client_for(params)
    versions = client.search_model_versions(f"name='{cfg.model_name}'")
    held: dict[str, list[str]] = {}
    if versions:  # search results carry no aliases; the registered model has them all
        for alias, version in client.get_registered_model(cfg.model_name).aliases.items():
            held.setdefault(str(version), []).append(alias)
    rows = []
    for v in versions:
        value = metric_value(v, cfg.metric)
        rows.append({"version": str(v.version), "aliases": sorted(held.get(str(v.version), [])), "metric": cfg.metric,
                     "value": value if math.isfinite(value) else None, "run_id": v.run_id,
                     "holdout_class": v.tags.get(HOLDOUT_TAG, ""), "gate": v.tags.get("gate", "")})
    return sorted(rows, key=lambda r: -int(r["version"]))


def format_move(result: dict) -> str:
    """One line saying what a promote or rollback did."""
    old = "none" if result["old"] is None else f"v{result['old']}"
    if not result["changed"]:
        return f"{result['name']}: champion is already v{result['new']}; nothing changed"
    skipped = result.get("skipped_deleted") or []
    note = f" (skipped deleted {', '.join('v' + s for s in skipped)})" if skipped else ""
    return f"{result['name']}: champion {old} -> v{result['new']} ({result['action']}){note}"
