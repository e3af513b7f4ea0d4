"""Prefect flow for batch scoring: pin the champion, list scenes, score each exactly once in parallel, aggregate.

The fan-out runs on the task runner chosen by ``score.task_runner``: a thread pool on this machine, or Dask
(``score.dask_address``, or a local cluster of ``score.dask_workers`` processes) so many machines share the work.
The manifest (geoclip.scoring.ledger) keeps it exactly once whatever runs, retries or workers overlap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from geoclip.config import ScoreConfig, load_params
from geoclip.retries import retry_condition
from geoclip.scoring.runs import ScoringPlan

# Backoff for S3, MLflow and network failures; input errors fail at once (geoclip.retries).
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [5, 30, 120], "retry_condition_fn": retry_condition}


def make_task_runner(cfg: ScoreConfig):
    """The task runner for the scene fan-out: ``thread`` (ThreadPoolTaskRunner) or ``dask`` (prefect-dask)."""
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        # One thread per worker process: scoring is CPU-bound numpy/torch work that runs its own threads.
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "host": "127.0.0.1"})
    return ThreadPoolTaskRunner()


@task(**IO_RETRIES)
def plan_task(params_path: str, source: str | None, out_dir: str | None, model_uri: str | None) -> ScoringPlan:
    """Pin the model (default: the champion alias), list the scenes and check every one (geoclip.scoring.runs)."""
    from geoclip.scoring.runs import plan_scoring

    return plan_scoring(load_params(params_path), model_uri, source, out_dir)


@task(**IO_RETRIES, tags=["geoclip-scoring"])
def score_scene_task(params_path: str, plan: ScoringPlan, scene_uri: str) -> dict:
    """Score one scene with the pinned model unless the manifest has it done (claim -> score -> done -> release)."""
    from geoclip.scoring.runs import score_planned_scene

    return score_planned_scene(load_params(params_path), plan, scene_uri)


@task(**IO_RETRIES)
def summary_task(results: list[dict], plan: ScoringPlan) -> str:
    """Write the overall summary.json; return where it is."""
    from geoclip.scoring.score import write_summary

    return write_summary(results, plan.out, plan.model_uri)


@flow(name="geoclip-score-scenes", log_prints=True)
def score_scenes_flow(params_path: str, source: str | None = None, out_dir: str | None = None,
                      model_uri: str | None = None) -> dict:
    """The fan-out itself (its task runner is set by :func:`scoring_flow`)."""
    plan = plan_task(params_path, source, out_dir, model_uri)
    results = score_scene_task.map(unmapped(params_path), unmapped(plan), plan.scenes).result()
    summary = summary_task(results, plan)
    scored = sum(r.get("status") == "scored" for r in results)
    print(f"{len(results)} scene(s) with {plan.model_uri}: {scored} scored, {len(results) - scored} already done; "
          f"summary at {summary}")
    return {"model_uri": plan.model_uri, "summary": summary, "scenes": results}


@flow(name="geoclip-scoring", log_prints=True)
def scoring_flow(params_path: str = "params.yaml", source: str | None = None, out_dir: str | None = None,
                 model_uri: str | None = None) -> dict:
    """Score every scene with the champion; return the pinned model URI, summary location and per-scene results."""
    params = load_params(params_path)  # bad params fail here, before any cluster starts
    runner = make_task_runner(params.score)
    return score_scenes_flow.with_options(task_runner=runner)(params_path, source, out_dir, model_uri)


def deploy(params_path: str = "params.yaml", work_pool: str = "local", name: str = "scheduled-scoring") -> str:
    """Register the scoring deployment on a process work pool, code from this project folder, cron from params."""
    from prefect.schedules import Cron

    params = load_params(params_path)
    root = Path(__file__).resolve().parents[1]
    remote = scoring_flow.from_source(source=str(root), entrypoint="flows/scoring.py:scoring_flow")
    deployment_id = remote.deploy(name=name, work_pool_name=work_pool, schedule=Cron(params.score.cron, timezone="UTC"),
                                  parameters={"params_path": params_path}, tags=["geoclip", "scoring"],
                                  description=scoring_flow.description, print_next_steps=False)
    return str(deployment_id)


def main(argv: list[str] | None = None) -> None:
    """Serve the scoring flow on the ``score.cron`` schedule, or (``--deploy POOL``) deploy it to a work pool."""
    ap = argparse.ArgumentParser(prog="python -m flows.scoring", description=main.__doc__)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--deploy", metavar="POOL", default=None,
                    help="register the deployment on this process work pool instead of serving it here")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.deploy:
        print(f"deployment {deploy(args.params, args.deploy)}: geoclip-scoring/scheduled-scoring on pool "
              f"{args.deploy!r}, cron {params.score.cron!r} (UTC)")
        return
    from prefect.settings import PREFECT_API_URL

    require_server(PREFECT_API_URL.value())
    # pause_on_shutdown=False: restarting the server process must not silently pause the schedule. A name of its
    # own: serving must never replace the `prefect deploy` deployment (scheduled-scoring, on a work pool).
    scoring_flow.serve(name=SERVED_NAME, cron=params.score.cron, parameters={"params_path": args.params},
                       pause_on_shutdown=False)


#: The deployment `python -m flows.scoring` serves (prefect.yaml's is scheduled-scoring).
SERVED_NAME = "served-scoring"


def require_server(api_url: str | None) -> None:
    """Refuse to serve on Prefect's ephemeral server: it runs no scheduler, so no run would ever be created."""
    if not api_url:
        raise SystemExit("python -m flows.scoring: PREFECT_API_URL is not set; a schedule needs a Prefect server: "
                         "start one (`make services`, or `prefect server start`) and export "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")


if __name__ == "__main__":
    main()
