"""The pipeline's stages, one function each: what dvc.yaml (through ``geoclip <stage>``), the Prefect flows and the
tests call. Each hands its params to the library function that does the work; train and evaluate also record the
run in MLflow, which the training code itself never imports.

``python -m geoclip.stages --params params.yaml [--resume]`` is one training rank: what torchrun starts.
"""

from __future__ import annotations

import argparse
import codecs
import json
import subprocess
import sys
from pathlib import Path

from geoclip.config import Params, load_params
from geoclip.errors import GeoclipError


def ingest(params: Params) -> dict:
    """Bring tiles from ``ingest.source`` (synthetic, folder, manifest, s3://) into ``paths.raw``."""
    from geoclip.data.ingest import ingest as run

    return run(params)


def validate(params: Params) -> dict:
    """Run the Great Expectations suites on the raw tiles and labels; write the reports and Data Docs."""
    from geoclip.data.validate import validate as run

    return run(params)


def prepare(params: Params) -> Path:
    """Split, check the splits, compute train-only band statistics and pack the tiles; return the prepared folder."""
    from geoclip.data.prepare import prepare as run

    return run(params)


def train(params: Params, resume: bool = False) -> dict:
    """Train in this process (one rank of torchrun, or alone): rank 0 tracks the run in MLflow, then logs the model
    files, curves and validation reports to it and writes ``run.json``."""
    from geoclip.registry.tracking import log_training_results, training_run_opener
    from geoclip.training.checkpoint import CHECKPOINT_FILE
    from geoclip.training.train import CURVE_FILE, HISTORY_FILE
    from geoclip.training.train import train as run

    model_dir = Path(params.paths.model)
    result = run(params, resume=resume, open_log=training_run_opener(params, model_dir / CHECKPOINT_FILE))
    if result["run_id"]:  # rank 0
        from geoclip.model.clip import CONFIG_FILE, WEIGHTS_FILE

        log_training_results(params, result["run_id"], [model_dir / HISTORY_FILE, model_dir / CURVE_FILE],
                             [model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE])
    return result


def torchrun_command(params: Params, params_path: str | Path, resume: bool = False) -> list[str]:
    """The torchrun command line that runs :func:`train` on ``train.nproc_per_node`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={params.train.nproc_per_node}", "-m", "geoclip.stages", "--params", str(params_path),
            *(["--resume"] if resume else [])]


def launch_training(params_path: str | Path = "params.yaml", resume: bool = False) -> None:
    """Run :func:`train` through torchrun (the train stage of dvc.yaml and the flow); raise on failure."""
    params = load_params(params_path)
    if params.train.nproc_per_node < 1:
        raise GeoclipError(f"train.nproc_per_node: expected at least 1, got {params.train.nproc_per_node}")
    proc = subprocess.Popen(torchrun_command(params, params_path, resume), stderr=subprocess.PIPE)
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    # Pass the workers' stderr (progress bars, errors) through, remembering the end to name the failure.
    for chunk in iter(lambda: proc.stderr.read1(65536), b""):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-65536:]
    rc = proc.wait()
    if rc != 0:
        errors = [ln for ln in tail.splitlines() if ln.startswith("error: ")]
        reason = errors[-1][len("error: "):] if errors else "see the log above"
        raise GeoclipError(f"training (torchrun, exit code {rc}) failed: {reason}")


def evaluate(params: Params) -> dict:
    """Evaluate the trained model on the test split and add the metrics and figures to its MLflow run."""
    from geoclip.registry.tracking import log_evaluation, read_run_info
    from geoclip.training.evaluate import OUTPUT_FILES, check_inputs
    from geoclip.training.evaluate import evaluate as run

    check_inputs(params)
    run_id = read_run_info(params)["run_id"]  # fail before writing anything
    result = run(params)
    scalars = {k: v for k, v in result.items() if k != "per_class"}
    log_evaluation(params, run_id, scalars, [Path(params.paths.eval) / f for f in OUTPUT_FILES])
    return result


def register(params: Params) -> dict:
    """Log the model as an MLflow pyfunc, register it and move the aliases through the champion gate."""
    from geoclip.registry.register import register as run

    return run(params)


def score(params: Params, model_uri: str | None = None, source: str | None = None,
          out_dir: str | None = None) -> list[dict]:
    """Score every scene (default ``score.scenes``) exactly once with the registered model (default the champion)."""
    from geoclip.scoring.runs import score_scenes

    return score_scenes(params, model_uri=model_uri, source=source, out_dir=out_dir)


def fewshot(params: Params, tiles: str | Path, model_uri_or_dir: str | Path, out_json: str | Path) -> dict:
    """Adapt a model folder or registered model with ``fewshot.shots`` tiles per class; report accuracy on the rest."""
    from geoclip.registry.models import load_geoclip
    from geoclip.training.fewshot import fewshot as run

    return run(params, tiles, load_geoclip(model_uri_or_dir, params), out_json, model_name=str(model_uri_or_dir))


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point, one training rank: ``python -m geoclip.stages --params params.yaml [--resume]``."""
    ap = argparse.ArgumentParser(prog="python -m geoclip.stages", description=main.__doc__)
    ap.add_argument("--params", default="params.yaml", help="path to params.yaml")
    ap.add_argument("--resume", action="store_true", help="continue from {paths.model}/checkpoint.pt")
    args = ap.parse_args(argv)
    try:
        result = train(load_params(args.params), resume=args.resume)
    except GeoclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if result["run_id"]:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
