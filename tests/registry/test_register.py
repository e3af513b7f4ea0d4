"""Registration and the champion gate, against a real MLflow server."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
from factories import make_model_dir, synthetic_tiles
from mlflow import MlflowClient

from geoclip.bands import ALL_BAND_NAMES, EUROSAT_CLASSES
from geoclip.cli import main
from geoclip.config import params_from_dict
from geoclip.data.storage import data_version
from geoclip.errors import GeoclipError
from geoclip.registry.aliases import (
    HISTORY_TAG,
    champion_history,
    decide,
    format_move,
    gate_version,
    live_version,
    promote,
    rollback,
)
from geoclip.registry.integrity import DIGEST_TAG, logged_model_digest
from geoclip.registry.register import lr_text, params_hash, register
from geoclip.registry.tracking import configure, write_run_info


def write_test_pack(prepared: Path, n: int = 3) -> None:
    """A minimal prepared folder: the test split pack, stats.json and index.csv."""
    prepared.mkdir(parents=True, exist_ok=True)
    np.save(prepared / "test_images.npy", synthetic_tiles(n))
    np.save(prepared / "test_labels.npy", np.arange(n, dtype=np.int64))
    (prepared / "stats.json").write_text(json.dumps({"band_names": list(ALL_BAND_NAMES),
                                                     "class_names": list(EUROSAT_CLASSES),
                                                     "mean": [1500.0] * 13, "std": [800.0] * 13}))
    (prepared / "index.csv").write_text("id,path,class,split\n" + "".join(
        f"t{i},tiles/x_{i}.tif,Forest,test\n" for i in range(n)))


@pytest.fixture
def params(tmp_path, mlflow_server, monkeypatch):
    """Params pointing at tmp folders, the real server and a fresh registered-model name; a model is saved."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = params_from_dict({
        "paths": {k: str(tmp_path / k) for k in ("raw", "prepared", "reports", "model", "eval", "scores")},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "test-register"},
        "register": {"model_name": f"geoclip-{uuid.uuid4().hex[:8]}"},
    })
    write_test_pack(Path(p.paths.prepared))
    make_model_dir(Path(p.paths.model))
    return p


def trained(params, val_top1: float, run_params: dict | None = None, run_tags: dict | None = None) -> str:
    """Pretend a training run and an evaluation happened: run.json and metrics.json; return the run id."""
    experiment_id = configure(params)
    with mlflow.start_run() as run:
        if run_params:
            mlflow.log_params(run_params)
        if run_tags:
            mlflow.set_tags(run_tags)
    write_run_info(params, run.info.run_id, experiment_id)
    metrics = Path(params.paths.eval) / "metrics.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    # Non-numbers and non-finite numbers are in real metrics files too; they must not become tags.
    metrics.write_text(json.dumps({"val_top1": val_top1, "test_top1": 0.1, "test_ece": float("nan"),
                                   "per_class": [0.5, 0.5]}))
    return run.info.run_id


def bare_version(client: MlflowClient, name: str, value: float | None, **tags: str) -> str:
    """A registered version without a logged model (fast): only what the gate and the aliases read."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # already there
    if value is not None:
        tags["val_top1"] = repr(value)
    return str(client.create_model_version(name, source="s3://geoclip-tests/no-model", tags=tags).version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version of the registered model."""
    return dict(client.get_registered_model(name).aliases)


def write_params_file(params, path: Path) -> str:
    """params as a params.yaml for the CLI."""
    import yaml

    path.write_text(yaml.safe_dump(asdict(params)))
    return str(path)


def test_gate_tags_and_description_through_register(params):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)

    run1 = trained(params, 0.6)
    first = register(params)
    assert (first["version"], first["alias"], first["champion_version"]) == ("1", "champion", "1")
    assert "no champion yet" in first["reason"]
    assert json.loads((Path(params.paths.model) / "registered.json").read_text()) == first
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == run1 and v1.tags["run_id"] == run1
    assert float(v1.tags["val_top1"]) == 0.6  # the tag older versions carry; the gate reads it
    assert not [k for k in v1.tags if k.startswith("metric.")]  # metrics live in the description and the run
    assert len(v1.tags) <= 9, sorted(v1.tags)  # few enough for the version page to show them all
    assert v1.tags["params_hash"] == params_hash(params) == first["params_hash"]
    assert v1.tags["data_version"] == data_version(params.paths.prepared) == first["data_version"]
    assert v1.tags["git_revision"] and "holdout_class" not in v1.tags and "pretrained" not in v1.tags
    assert "Prior: none" in v1.description
    assert v1.tags[DIGEST_TAG] == logged_model_digest(f"models:/{name}/1")  # what scoring checks before loading
    for text in [f"data_version {first['data_version']}", "tiles test 3", "13 bands B01",
                 f"encoder {params.train.image_encoder}", f"loss {params.train.loss}",
                 f"epochs {params.train.epochs}", f"params_hash {params_hash(params)[:12]}",
                 "val_top1 0.6", "test_top1 0.1", "Gate: champion: no champion yet", run1]:
        assert text in v1.description, text
    headline = v1.description.split("\n\n")[0]  # what a reviewer reads first, above the tags
    assert headline.startswith("**champion** - val_top1 **0.6**; no champion yet")
    assert f"git {v1.tags['git_revision'][:12]}" in headline

    trained(params, 0.59)  # worse: never champion
    second = register(params)
    assert (second["version"], second["alias"], second["champion_version"]) == ("2", "challenger", "1")
    assert second["reason"] == "val_top1 0.59 does not beat champion v1's 0.6 by more than margin 0.005"
    assert aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert f"Gate: challenger: {second['reason']}" in client.get_model_version(name, "2").description

    trained(params, 0.62)
    third = register(params)
    assert (third["version"], third["alias"], third["champion_version"]) == ("3", "champion", "3")
    assert third["reason"] == "val_top1 0.62 beats champion v1's 0.6 by 0.02, more than margin 0.005"
    assert (third["previous_champion_version"], third["previous_champion_value"]) == ("1", 0.6)
    assert aliases(client, name) == {"champion": "3", "challenger": "2"}
    assert champion_history(client, name) == ["1", "3"]  # register() records its moves for rollback
    # The champion loads as a pyfunc and takes a batch larger than the input example.
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert champion.predict(synthetic_tiles(5))["probabilities"].shape == (5, 10)


def test_holdout_run_never_becomes_champion(params):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)
    # params.yaml no longer says so, but the training run tagged it (as train.py does): the run is the truth.
    trained(params, 0.99, run_tags={"holdout_class": "Forest"})
    result = register(params)
    assert (result["alias"], result["champion_version"], result["holdout_class"]) == ("challenger", None, "Forest")
    assert "'Forest'" in result["reason"] and "never champion" in result["reason"]
    assert aliases(client, name) == {"challenger": "1"}  # even with no champion at all
    version = client.get_model_version(name, "1")
    assert version.tags["holdout_class"] == "Forest" and "holdout_class Forest" in version.description
    # The same through params alone, and against a weak champion: still challenger.
    held = replace(params, train=replace(params.train, holdout_class="Forest"))
    assert decide("val_top1", 0.99, 0.005, None, "Forest")[0] is False
    weak = bare_version(client, name, 0.1)
    client.set_registered_model_alias(name, "champion", weak)
    assert gate_version(client, held.register, "1", 0.99, "Forest")["alias"] == "challenger"
    assert aliases(client, name)["champion"] == weak
    with pytest.raises(GeoclipError, match=rf"^model '{name}': version 1 was trained without class 'Forest'"):
        promote(params, "1")
    assert promote(params, "1", force=True)["new"] == "1"  # a person may still choose it, explicitly


@pytest.mark.parametrize(("value", "alias"), [
    (0.59, "challenger"),    # worse
    (0.6, "challenger"),     # equal
    (0.603, "challenger"),   # better, within the margin
    (0.605, "challenger"),   # better by exactly the margin: not MORE than it
    (0.6051, "champion"),    # better by more than the margin
])
def test_gate_margin_on_the_server(params, value, alias):
    name, cfg = params.register.model_name, params.register
    client = MlflowClient(params.mlflow.tracking_uri)
    v1 = bare_version(client, name, 0.6)
    assert gate_version(client, cfg, v1, 0.6)["alias"] == "champion"
    v2 = bare_version(client, name, value)
    result = gate_version(client, cfg, v2, value)
    assert result["alias"] == alias and result["previous_champion_version"] == v1
    assert aliases(client, name)["champion"] == (v2 if alias == "champion" else v1)
    assert client.get_model_version(name, v2).tags["gate"] == f"{alias}: {result['reason']}"


def test_champion_without_the_metric_tag_is_replaced_and_margin_comes_from_params():
    champion = type("V", (), {"version": "4", "tags": {}})()
    why = "champion v4 has no val_top1 tag: val_top1 0.1 replaces it"
    assert decide("val_top1", 0.1, 0.005, champion) == (True, why)
    champion.tags = {"metric.val_top1": "0.5"}  # the metric.<name> tag also counts
    assert decide("val_top1", 0.55, 0.1, champion)[0] is False
    assert decide("val_top1", 0.65, 0.1, champion)[0] is True


def test_params_hash_follows_the_model_params_only(params):
    base = params_hash(params)
    assert len(base) == 64 and base == params_hash(replace(params))
    assert params_hash(replace(params, train=replace(params.train, epochs=params.train.epochs + 1))) != base
    assert params_hash(replace(params, bands=params.bands[:3])) != base
    # Where files live or which server tracks them does not change what the model is.
    moved = replace(params, paths=replace(params.paths, model="/elsewhere"),
                    mlflow=replace(params.mlflow, tracking_uri="http://127.0.0.1:1"))
    assert params_hash(moved) == base


def test_params_that_differ_from_the_training_run_are_refused(params):
    trained(params, 0.7, run_params={"train.epochs": str(params.train.epochs + 5)})
    with pytest.raises(GeoclipError, match=rf"^params train.epochs: '{params.train.epochs}' but training run "):
        register(params)
    assert not (Path(params.paths.model) / "registered.json").exists()
    assert MlflowClient(params.mlflow.tracking_uri).search_model_versions(f"name='{params.register.model_name}'") == []


def test_promote_then_rollback_round_trip_on_the_cli(params, tmp_path, capsys):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)
    cli = ["--params", write_params_file(params, tmp_path / "params.yaml"), "registry"]
    v1 = bare_version(client, name, 0.6)
    gate_version(client, params.register, v1, 0.6)
    v2 = bare_version(client, name, 0.59)
    gate_version(client, params.register, v2, 0.59)  # challenger
    capsys.readouterr()  # MLflow's own log lines so far

    assert main([*cli, "promote", v2]) == 0
    assert capsys.readouterr().out == f"{name}: champion v1 -> v2 (promote)\n"
    assert aliases(client, name) == {"champion": "2"}  # the promoted challenger no longer challenges
    assert champion_history(client, name) == ["1", "2"]
    assert client.get_model_version(name, v2).tags["champion_note"].startswith("promoted by")
    assert main([*cli, "promote", v2]) == 0
    assert "already v2; nothing changed" in capsys.readouterr().out
    assert champion_history(client, name) == ["1", "2"]

    assert main([*cli, "rollback"]) == 0
    assert capsys.readouterr().out == f"{name}: champion v2 -> v1 (rollback)\n"
    assert aliases(client, name) == {"champion": "1"} and champion_history(client, name) == ["1"]

    assert main([*cli, "rollback"]) == 2  # nothing before v1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: model '{name}': no previous champion to roll back to")
    assert aliases(client, name) == {"champion": "1"}

    assert main([*cli, "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("v2  -  val_top1 0.59  gate: challenger: val_top1 0.59 does not beat")
    assert out[1].startswith("v1  champion  val_top1 0.6  gate: champion: no champion yet")
    assert out[2] == "champion history: v1"


def test_rollback_with_no_history_fails_with_one_line(params, tmp_path, capsys):
    name = params.register.model_name
    cli = ["--params", write_params_file(params, tmp_path / "params.yaml"), "registry", "rollback"]
    assert main(cli) == 2  # no such model at all
    assert capsys.readouterr().err == f"error: model '{name}': not in the registry; run `geoclip register` first\n"
    client = MlflowClient(params.mlflow.tracking_uri)
    gate_version(client, params.register, bare_version(client, name, 0.6), 0.6)
    capsys.readouterr()  # MLflow's own log lines so far
    assert main(cli) == 2  # one champion, nothing before it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no previous champion to roll back to (champion: v1" in err


def test_promote_refuses_unknown_and_deleted_versions(params, tmp_path, capsys):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)
    cli = ["--params", write_params_file(params, tmp_path / "params.yaml"), "registry", "promote"]
    for v in ("1", "2", "3"):
        bare_version(client, name, 0.5)
    client.set_registered_model_alias(name, "champion", "1")
    client.delete_model_version(name, "2")
    capsys.readouterr()  # MLflow's own log lines so far
    for version, message in [("9", f"model '{name}': version 9 does not exist (versions: 1, 3)"),
                             ("2", f"model '{name}': version 2 was deleted (versions: 1, 3)"),
                             ("abc", f"model '{name}': version 'abc' is not a version number (1, 2, ...)")]:
        assert main([*cli, version]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert aliases(client, name) == {"champion": "1"}  # nothing moved


def test_rollback_skips_deleted_versions_and_reaches_a_champion_set_outside_geoclip(params):
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)
    for _ in range(4):
        bare_version(client, name, 0.5)
    client.set_registered_model_alias(name, "champion", "1")  # e.g. set by hand in the registry UI
    promote(params, "2")
    promote(params, "3")
    result = promote(params, "4")
    assert champion_history(client, name) == ["1", "2", "3", "4"] and result["old"] == "3"
    client.delete_model_version(name, "3")
    result = rollback(params)
    assert (result["old"], result["new"], result["skipped_deleted"]) == ("4", "2", ["3"])
    assert format_move(result) == f"{name}: champion v4 -> v2 (rollback) (skipped deleted v3)"
    assert rollback(params)["new"] == "1"
    assert json.loads(client.get_registered_model(name).tags[HISTORY_TAG]) == ["1"]
    with pytest.raises(GeoclipError, match="version 7 does not exist"):
        live_version(client, name, "7")


def test_missing_metrics_file_is_refused_before_logging(params):
    trained(params, 0.5)
    (Path(params.paths.eval) / "metrics.json").unlink()
    with pytest.raises(GeoclipError, match="metrics.json: not found"):
        register(params)
    assert not (Path(params.paths.model) / "registered.json").exists()
    assert MlflowClient(params.mlflow.tracking_uri).search_model_versions(f"name='{params.register.model_name}'") == []


def test_unknown_metric_names_the_metric_and_the_keys(params):
    trained(params, 0.5)
    p = params_from_dict({**_as_dict(params), "register": {"model_name": params.register.model_name,
                                                           "metric": "val_f1"}})
    with pytest.raises(GeoclipError, match=r"'val_f1'.*test_top1"):
        register(p)


def test_missing_run_info_is_refused(params):
    Path(params.paths.eval).mkdir(parents=True, exist_ok=True)
    (Path(params.paths.eval) / "metrics.json").write_text('{"val_top1": 0.5}')
    with pytest.raises(GeoclipError, match="run.json: not found"):
        register(params)


def _as_dict(params) -> dict:
    """Params back to a plain mapping (for building a variant)."""
    return asdict(params)


def test_registering_the_same_run_again_returns_its_version_not_a_new_one(params):
    """A retried Prefect task (or a second `geoclip register`) for one training run: one version, the same answer."""
    name = params.register.model_name
    client = MlflowClient(params.mlflow.tracking_uri)
    trained(params, 0.6)
    first = register(params)
    (Path(params.paths.model) / "registered.json").unlink()  # as if the first attempt stopped before writing it
    again = register(params)
    assert (again["version"], again["alias"], again["run_id"]) == (first["version"], first["alias"], first["run_id"])
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [first["version"]]
    assert register(params)["version"] == first["version"]


def _gate_in_a_process(tracking_uri: str, register_params, version: str, value: float, barrier, results) -> None:
    """One racer: its own process and client, released with the others by the barrier."""
    client = MlflowClient(tracking_uri)
    barrier.wait()
    try:
        results[version] = gate_version(client, register_params, version, value)
    except Exception as exc:  # reported by the test with the others' results
        results[version] = {"alias": "error", "reason": f"{type(exc).__name__}: {exc}"}


def test_concurrent_gates_never_both_take_the_empty_champion_seat(params):
    """Five registrations in five processes gated at the same moment: one becomes the first champion."""
    name = params.register.model_name
    setup = MlflowClient(params.mlflow.tracking_uri)
    values = [0.50 + 0.01 * i for i in range(5)]
    versions = [bare_version(setup, name, v) for v in values]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no shared client, session or lock
    with ctx.Manager() as manager:
        barrier, shared = manager.Barrier(len(versions)), manager.dict()
        racers = [ctx.Process(target=_gate_in_a_process,
                              args=(params.mlflow.tracking_uri, params.register, v, x, barrier, shared))
                  for v, x in zip(versions, values)]
        [r.start() for r in racers]
        [r.join(timeout=300) for r in racers]
        assert [r.exitcode for r in racers] == [0] * len(racers)
        results: dict[str, dict] = dict(shared)
    assert not [r for r in results.values() if r["alias"] == "error"], results
    assert sum("no champion yet" in r["reason"] for r in results.values()) == 1, results
    history = champion_history(setup, name)
    champions = [results[v]["alias"] == "champion" for v in versions]
    # Every champion in turn beat the one before by more than the margin: the history is strictly better each time.
    assert [v for v, won in zip(versions, champions) if won] == sorted(history, key=int)
    assert [float(setup.get_model_version(name, v).tags["val_top1"]) for v in history] == sorted(
        float(setup.get_model_version(name, v).tags["val_top1"]) for v in history)
    assert not [m for m in setup.search_registered_models() if m.name == name + ".alias-lock"]  # released


def test_the_description_gives_the_learning_rate_the_run_trained_at():
    assert lr_text(params_from_dict({"train": {"lr": 0.001}}).train) == "0.001"
    scaled = params_from_dict({"train": {"lr": 0.001, "batch_size": 512, "lr_scaling": "sqrt"}}).train
    assert lr_text(scaled) == "0.002 (sqrt from 0.001 at batch 128)"


def test_a_versions_tags_and_description_name_its_pretrained_prior(params):
    """The prior's name and package release as tags, its licence, digest and training data in the description."""
    from geoclip.model.pretrained import DEFAULT_PRIOR, get_source

    source = get_source(DEFAULT_PRIOR)
    config = Path(params.paths.model) / "model_config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps(saved | {"pretrained": DEFAULT_PRIOR, "provenance": source.provenance()}))
    try:
        trained(params, 0.5)
        version = register(params)["version"]
    finally:
        config.write_text(json.dumps(saved))
    v = MlflowClient(params.mlflow.tracking_uri).get_model_version(params.register.model_name, version)
    assert v.tags["pretrained"] == DEFAULT_PRIOR and len(v.tags) <= 10
    for text in (f"Prior: {DEFAULT_PRIOR}", f"{source.package}=={source.version}", "licence Apache-2.0",
                 source.sha256[:12], "ImageNet-1k",
                 f"encoder {source.architecture}"):
        assert text in v.description, text
