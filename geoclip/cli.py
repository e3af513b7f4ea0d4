"""The ``geoclip`` command line: one subcommand per pipeline stage (geoclip.stages), plus the tools around them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geoclip import stages
from geoclip.config import load_params
from geoclip.errors import GeoclipError


def _print(obj) -> None:
    """Print a step's summary as JSON."""
    print(json.dumps(obj, indent=2, default=str))


def cmd_ingest(args) -> None:
    """Bring tiles from ingest.source (synthetic, folder, manifest, s3://) into paths.raw."""
    _print(stages.ingest(load_params(args.params)))


def cmd_calibrate(args) -> None:
    """Compare synthetic spectra with real EuroSAT_MS tiles; write a markdown table."""
    from geoclip.data.synth import calibrate

    params = load_params(args.params)
    from geoclip.devtools.diagram import draw_samples

    tiles = Path(params.paths.raw) / "tiles"
    calibrate(Path(args.real), tiles, Path(args.out), args.held_out)
    samples = draw_samples(Path(args.real), tiles, Path(args.out).with_name("samples.png"))
    print(f"wrote {args.out} and {samples}")


def cmd_validate(args) -> None:
    """Run the Great Expectations suites on the raw data."""
    _print(stages.validate(load_params(args.params)))


def cmd_prepare(args) -> None:
    """Split, compute band statistics and pack the tiles."""
    print(f"wrote {stages.prepare(load_params(args.params))}")


def cmd_train(args) -> None:
    """Train through torchrun (``--in-process`` to skip torchrun, for debugging)."""
    if args.in_process:
        _print(stages.train(load_params(args.params), resume=args.resume))
    else:
        from geoclip.model.pretrained import check_available

        check_available(load_params(args.params).train.pretrained)  # fail fast, before starting workers
        stages.launch_training(args.params, resume=args.resume)


def cmd_priors(args) -> None:
    """List the pretrained image priors train.pretrained can name, and whether their weights are installed."""
    from geoclip.model.pretrained import list_sources

    _print(list_sources())


def cmd_evaluate(args) -> None:
    """Evaluate the trained model on the test split."""
    _print(stages.evaluate(load_params(args.params)))


def cmd_register(args) -> None:
    """Log the model to MLflow, register it and move the aliases."""
    _print(stages.register(load_params(args.params)))


def cmd_registry(args) -> None:
    """Registry aliases: `promote VERSION` to champion, `rollback` to the previous champion, `list` versions."""
    from geoclip.registry import aliases as registry

    params = load_params(args.params)
    if args.action == "list":
        rows = registry.list_versions(params)
        if not rows:
            print(f"{params.register.model_name}: no versions")
        for r in rows:
            value = "-" if r["value"] is None else f"{r['value']:.4g}"
            holdout = f"  holdout {r['holdout_class']}" if r["holdout_class"] else ""
            names = ",".join(r["aliases"]) or "-"
            print(f"v{r['version']}  {names}  {r['metric']} {value}{holdout}  gate: {r['gate']}")
        if rows:
            history = registry.champion_history(registry.client_for(params), params.register.model_name)
            print("champion history: " + (" -> ".join(f"v{v}" for v in history) or "none recorded"))
        return
    if args.action == "promote":
        if args.version is None:
            raise GeoclipError("registry promote: VERSION missing; e.g. `geoclip registry promote 3`")
        result = registry.promote(params, args.version, force=args.force)
    else:
        if args.version is not None:
            raise GeoclipError(f"registry rollback: takes no VERSION (got {args.version!r}); "
                               f"use `promote {args.version}`")
        result = registry.rollback(params)
    print(registry.format_move(result))


def cmd_relocate(args) -> None:
    """After moving or copying the project: point its local MLflow store at this folder's artifacts."""
    from geoclip.registry.relocate import relocate

    result = relocate(load_params(args.params))
    if result["from"] is None:
        print(f"{result['store']}: already this project's ({result['to']}); nothing to change")
        return
    rows = ", ".join(f"{k} {n}" for k, n in result["changed"].items()) or "no rows"
    print(f"{result['store']}: artifact locations moved from {result['from']} to {result['to']} ({rows})")


def cmd_score(args) -> None:
    """Score large scenes with the registered champion."""
    from dataclasses import replace

    params = load_params(args.params)
    if args.classes or args.classes_file:  # the command line's class list replaces params.yaml's (checked there)
        from geoclip.model.vocab import parse_class_list

        names = parse_class_list(args.classes) if args.classes else []
        params = replace(params, score=replace(params.score, classes=names, classes_file=args.classes_file or ""))
    _print(stages.score(params, model_uri=args.model, source=args.scenes, out_dir=args.out))


def _class_list(args) -> dict[str, list[str]] | None:
    """The served model's class params from ``--classes`` or ``--classes-file`` (None: the trained classes)."""
    from geoclip.model.vocab import parse_class_list, requested_classes

    return requested_classes(parse_class_list(args.classes) if args.classes else None, args.classes_file, "--classes")


def cmd_predict(args) -> None:
    """Classify tiles and write a CSV of classes and probabilities."""
    from geoclip.scoring.predict import predict_tiles
    from geoclip.scoring.score import read_options

    params = load_params(args.params)
    if args.model is None:
        from geoclip.registry.tracking import configure

        configure(params)
    df = predict_tiles(args.tiles, args.model or params.score.model_uri, args.out, batch_size=args.batch_size,
                       classes=_class_list(args), read=read_options(params.score))
    print(f"wrote {args.out} ({len(df)} tiles{_novelty_note(df)})")


def _novelty_note(df) -> str:
    """How many predicted tiles are unlike anything trained (novelty >= 0.95), for the ``wrote`` line."""
    from geoclip.scoring.score import NOVELTY_THRESHOLD

    if "novelty" not in df or not len(df):
        return ""
    if df["novelty"].isna().all():
        return "; novelty: not calibrated"
    n = int((df["novelty"] >= NOVELTY_THRESHOLD).sum())
    return f"; {n} with novelty >= {NOVELTY_THRESHOLD}: unlike anything the model was trained on"


def cmd_search(args) -> None:
    """Find windows (from scoring's embeddings) or tiles that match a text query."""
    from geoclip.scoring.search import run_search

    hits = run_search(load_params(args.params), args.text, index=args.index, tiles=args.tiles, model_uri=args.model,
                      out_dir=args.out, top=args.top, mosaic=not args.no_mosaic)
    print(hits.drop(columns=["crs"]).head(10).to_string(index=False))
    print(f"wrote {args.out}/hits.geojson, hits.csv" + ("" if args.no_mosaic else ", hits.png") + f" ({len(hits)} hits)")


def cmd_storage(args) -> None:
    """DVC storage: `configure` the S3 remote in .dvc/config.local, or print the data `version`."""
    from geoclip.data.storage import configure_remote, data_version

    params = load_params(args.params)
    if args.action == "configure":
        _print(configure_remote(params, args.repo))
    else:
        print(data_version(params.paths.prepared))


def cmd_export(args) -> None:
    """Export the image encoder + class embeddings (TorchScript or ONNX), checked against PyTorch."""
    from geoclip.registry.export import export_model

    params = load_params(args.params)
    model_dir = args.model or params.paths.model
    out = args.out or str(Path(model_dir) / "export")
    _print(export_model(model_dir, out, fmt=args.format, prepared=params.paths.prepared))


def cmd_fewshot(args) -> None:
    """Adapt a trained model with k labelled tiles per class; print zero-shot vs adapted accuracy on the rest."""
    from dataclasses import replace

    from geoclip.training.fewshot import format_table

    params = load_params(args.params)
    f = params.fewshot
    params = replace(params, fewshot=replace(f, shots=f.shots if args.shots is None else args.shots,
                                             method=args.method or f.method))
    result = stages.fewshot(params, args.tiles, args.model or params.score.model_uri, args.out)
    print(format_table(result))
    print(f"wrote {args.out}")


def cmd_diagram(args) -> None:
    """Draw the architecture diagram."""
    from geoclip.devtools.diagram import draw_architecture

    draw_architecture(Path(args.out))
    print(f"wrote {args.out}")


def cmd_services(args) -> None:
    """Start moto S3, MLflow (SQLite, S3 artifacts) and Prefect on 127.0.0.1 until Ctrl-C."""
    from geoclip.devtools.services import run_services

    run_services(args.dir, {"s3": args.s3_port, "mlflow": args.mlflow_port, "prefect": args.prefect_port})
    print("services stopped")


def cmd_schedule(args) -> None:
    """Score on params.yaml's score.cron here: a Prefect server, prefect.yaml deployed, a worker; Ctrl-C stops."""
    from geoclip.devtools.schedule import PARAMS, run_schedule

    if args.params != PARAMS:  # the deployments name their params file; another one here would be silently unused
        raise GeoclipError(f"--params {args.params}: prefect.yaml's deployments read {PARAMS} of the project folder "
                           "(--project); edit that file instead")
    run_schedule(args.project, args.dir or Path(args.project) / ".services", args.prefect_port)
    print("stopped")


def _class_options(p: argparse.ArgumentParser) -> None:
    """``--classes`` / ``--classes-file``: answer over any class list instead of the trained one."""
    p.add_argument("--classes", default=None, help='class names to answer over, e.g. "lake, forest, vineyard" '
                   "(default: the model's trained classes)")
    p.add_argument("--classes-file", default=None,
                   help="YAML with names (and optionally descriptions, templates), as params.yaml's classes")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="geoclip", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    # --params is also accepted after the command name (SUPPRESS: an absent one keeps the value given before).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in [("ingest", cmd_ingest), ("validate", cmd_validate), ("prepare", cmd_prepare),
                     ("evaluate", cmd_evaluate), ("register", cmd_register), ("relocate", cmd_relocate),
                     ("priors", cmd_priors)]:
        sub.add_parser(name, help=fn.__doc__, parents=[common]).set_defaults(func=fn)
    p = sub.add_parser("train", help=cmd_train.__doc__, parents=[common])
    p.add_argument("--in-process", action="store_true", help="run in this process instead of torchrun")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in paths.model")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("score", help=cmd_score.__doc__, parents=[common])
    p.add_argument("--model", default=None, help="model URI (default: score.model_uri)")
    p.add_argument("--scenes", default=None, help="folder or s3:// prefix of scenes (default: score.scenes)")
    p.add_argument("--out", default=None, help="output folder or s3:// prefix (default: paths.scores)")
    _class_options(p)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("registry", help=cmd_registry.__doc__, parents=[common])
    p.add_argument("action", choices=["promote", "rollback", "list"])
    p.add_argument("version", nargs="?", default=None, help="promote: the model version to make champion")
    p.add_argument("--force", action="store_true", help="promote: allow an unseen-class (holdout) model")
    p.set_defaults(func=cmd_registry)
    p = sub.add_parser("predict", help=cmd_predict.__doc__, parents=[common])
    p.add_argument("tiles", help="EuroSAT_MS-layout folder, folder of tiles, or CSV manifest")
    p.add_argument("--model", default=None, help="MLflow model URI (default: score.model_uri)")
    p.add_argument("--out", default="preds.csv", help="output CSV (default: preds.csv)")
    p.add_argument("--batch-size", type=int, default=256)
    _class_options(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("search", help=cmd_search.__doc__, parents=[common])
    p.add_argument("text", help='what to find, e.g. "a river crossing farmland"')
    p.add_argument("--index", default=None, help="folder, file or s3:// prefix of *_embeddings.parquet "
                   "(scoring with score.embeddings: true writes them)")
    p.add_argument("--tiles", default=None, help="a folder or manifest of tiles to search as well")
    p.add_argument("--model", default=None, help="model URI or folder (default: the index's, else score.model_uri)")
    p.add_argument("--top", type=int, default=None, help="hits to return (default: search.top)")
    p.add_argument("--out", default="search", help="output folder (default: search)")
    p.add_argument("--no-mosaic", action="store_true", help="skip the quick-look mosaic of the hits")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("calibrate", help=cmd_calibrate.__doc__, parents=[common])
    p.add_argument("--real", required=True, help="folder of real EuroSAT_MS tiles to compare with")
    p.add_argument("--out", default="docs/calibration.md")
    p.add_argument("--held-out", default=None,
                   help="folder of real tiles never used to calibrate: the realism gap is reported on them too")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("storage", help=cmd_storage.__doc__, parents=[common])
    p.add_argument("action", choices=["configure", "version"])
    p.add_argument("--repo", default=".", help="DVC repository folder (default: .)")
    p.set_defaults(func=cmd_storage)
    p = sub.add_parser("fewshot", help=cmd_fewshot.__doc__, parents=[common])
    p.add_argument("tiles", help="labelled tiles: EuroSAT_MS-layout folder or CSV/Parquet manifest with a class column")
    p.add_argument("--model", default=None, help="model folder or MLflow URI (default: score.model_uri)")
    p.add_argument("--shots", type=int, default=None, help="tiles per class to adapt on (default: fewshot.shots)")
    p.add_argument("--method", choices=["linear_probe", "projection", "both"], default=None,
                   help="adaptation method (default: fewshot.method)")
    p.add_argument("--out", default="eval/fewshot.json", help="output JSON (default: eval/fewshot.json)")
    p.set_defaults(func=cmd_fewshot)
    p = sub.add_parser("diagram", help=cmd_diagram.__doc__, parents=[common])
    p.add_argument("--out", default="docs/architecture.png")
    p.set_defaults(func=cmd_diagram)
    p = sub.add_parser("export", help=cmd_export.__doc__, parents=[common])
    p.add_argument("--model", default=None, help="saved model folder (default: paths.model)")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    p.add_argument("--out", default=None, help="output folder (default: <model>/export)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("services", help=cmd_services.__doc__, parents=[common])
    p.add_argument("--dir", default=".services", help="state and logs folder (default: .services)")
    p.add_argument("--s3-port", type=int, default=9000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--prefect-port", type=int, default=4200)
    p.set_defaults(func=cmd_services)
    p = sub.add_parser("schedule", help=cmd_schedule.__doc__, parents=[common])
    p.add_argument("--project", default=".", help="folder of prefect.yaml and params.yaml (default: .)")
    p.add_argument("--dir", default=None, help="the server's state and the logs (default: .services of the project)")
    p.add_argument("--prefect-port", type=int, default=4200, help="port of the server started here (default: 4200)")
    p.set_defaults(func=cmd_schedule)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; a GeoclipError, or a full volume met by a writer geoclip does not wrap,
    becomes a one-line message and exit code 2."""
    from geoclip.diskspace import is_no_space, is_quota, no_space_message

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GeoclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_no_space(exc):
            raise
        where = exc.filename or "."
        print(f"error: {no_space_message(where, Path(where).name or 'a file', quota=is_quota(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
