"""Prefect flow for batch scoring: pin the champion, list scenes, score them in parallel, aggregate."""

from __future__ import annotations

import argparse

from prefect import flow, task, unmapped

from flows import transient
from geoclip.config import load_params

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [5, 30, 120], "retry_condition_fn": transient}


@task(**IO_RETRIES)
def champion_task(params_path: str, model_uri: str | None = None) -> str:
    """Resolve the model URI (default: the champion alias) to one registered version."""
    from geoclip.score import resolve_model_uri
    from geoclip.tracking import configure

    params = load_params(params_path)
    configure(params)
    return resolve_model_uri(model_uri or params.score.model_uri)


@task(**IO_RETRIES)
def list_scenes_task(source: str) -> list[str]:
    """List the scenes of a folder or S3 prefix."""
    from geoclip.score import list_scenes

    return list_scenes(source)


@task(**IO_RETRIES, tags=["geoclip-scoring"])
def score_scene_task(params_path: str, model_uri: str, scene_uri: str, out_uri: str) -> dict:
    """Score one scene with the pinned model (loaded once per worker process)."""
    from geoclip.score import load_scoring_model, score_one
    from geoclip.tracking import configure

    params = load_params(params_path)
    configure(params)
    return score_one(params, load_scoring_model(model_uri), scene_uri, out_uri, model_uri=model_uri)


@task(**IO_RETRIES)
def summary_task(results: list[dict], out_uri: str, model_uri: str) -> str:
    """Write the overall summary.json; return where it is."""
    from geoclip.score import write_summary

    return write_summary(results, out_uri, model_uri)


@flow(name="geoclip-scoring", log_prints=True)
def scoring_flow(params_path: str = "params.yaml", source: str | None = None, out_dir: str | None = None,
                 model_uri: str | None = None) -> dict:
    """Score every scene with the champion; return the pinned model URI, summary location and per-scene results."""
    params = load_params(params_path)
    out = out_dir or params.paths.scores
    pinned = champion_task(params_path, model_uri)
    scenes = list_scenes_task(source or params.score.scenes)
    results = score_scene_task.map(unmapped(params_path), unmapped(pinned), scenes, unmapped(out)).result()
    summary = summary_task(results, out, pinned)
    print(f"scored {len(results)} scene(s) with {pinned}; summary at {summary}")
    return {"model_uri": pinned, "summary": summary, "scenes": results}


def main(argv: list[str] | None = None) -> None:
    """Serve the scoring flow on the cron schedule from params (``score.cron``)."""
    ap = argparse.ArgumentParser(prog="python -m flows.scoring", description=main.__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    # pause_on_shutdown=False: restarting the server process must not silently pause the schedule.
    scoring_flow.serve(name="scheduled-scoring", cron=params.score.cron, parameters={"params_path": args.params},
                       pause_on_shutdown=False)


if __name__ == "__main__":
    main()
