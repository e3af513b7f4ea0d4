"""Scoring runs over many scenes: one plan (model pinned, scenes listed and checked) for the CLI, the DVC stage and
the Prefect flow alike, then each scene exactly once and an overall summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from geoclip.config import Params
from geoclip.registry.models import load_served_model, model_input_bands, resolve_model_uri
from geoclip.registry.tracking import configure
from geoclip.scoring.exactly_once import score_scene_once
from geoclip.scoring.ledger import Ledger
from geoclip.scoring.score import (
    check_scenes,
    class_request,
    list_scenes,
    scene_key,
    scene_keys,
    scoring_identity,
    write_summary,
)


@dataclass(frozen=True)
class ScoringPlan:
    """What one scoring run will do: which pinned model version, which scenes (all checked), where outputs go."""

    model_uri: str  # models:/name/<version>: an alias is pinned once, so every scene uses the same model
    scenes: list[str]
    out: str  # local folder or s3:// prefix
    root: str  # the scenes folder or prefix: a scene's identity is its path below it (score.scene_key)
    names: dict[str, str] = field(default_factory=dict)  # scene -> identity, kept apart where stems collide

    def name(self, scene: str) -> str:
        """The scene's identity: outputs and ledger entry (see geoclip.scoring.score.scene_keys)."""
        return self.names.get(scene) or scene_key(scene, self.root)


def plan_scoring(params: Params, model_uri: str | None = None, source: str | None = None,
                 out_dir: str | None = None) -> ScoringPlan:
    """List the scenes, pin the model and run the scenes suite on every scene before any is scored.

    A missing folder or bucket fails first; then every scene, local or on S3 (headers read through /vsis3/),
    passes the scenes suite (report under ``paths.reports``) before a model is loaded, a claim is made or any
    output folder exists.
    """
    root = str(source or params.score.scenes)
    scenes = list_scenes(root, params.score.allow_outside_paths)
    class_request(params.score)  # a bad class list fails before a model is resolved or a scene is checked
    configure(params)
    uri = resolve_model_uri(model_uri or params.score.model_uri)
    check_scenes(params, scenes, model_input_bands(uri), report=True)
    out = str(out_dir or params.paths.scores)
    ledger = Ledger(out, params.score.claim_timeout_s, wait_timeout_s=params.score.wait_timeout_s)
    return ScoringPlan(model_uri=uri, scenes=scenes, out=out, root=root,
                       names=scene_keys(scenes, root, ledger.recorded_inputs))


def score_planned_scene(params: Params, plan: ScoringPlan, scene: str, wait: bool = True) -> dict:
    """Score one scene of ``plan`` exactly once (skipped when done; with ``wait=False``, ``busy`` while another run
    holds it). The model is loaded only when the scene needs scoring."""
    configure(params)
    identity = scoring_identity(plan.model_uri, class_request(params.score))  # another class list: another scoring
    return score_scene_once(params, lambda: load_served_model(plan.model_uri), scene, plan.out, identity,
                            checked=True, wait=wait, name=plan.name(scene))


def score_scenes(params: Params, model_uri: str | None = None, source: str | None = None,
                 out_dir: str | None = None) -> list[dict]:
    """Score every scene of a folder or S3 prefix with the registered model, once per (scene content, model).

    Scenes already done are skipped (their recorded summaries still count); scenes another run is scoring are
    left to it and waited for after the rest. Writes per-scene summaries and the overall summary.json.
    """
    plan = plan_scoring(params, model_uri, source, out_dir)
    results: dict[str, dict] = {}
    for wait in (False, True):  # first every scene nobody holds, then wait for those other runs are scoring
        for scene in plan.scenes:
            if results.get(scene, {"status": "busy"})["status"] == "busy":
                results[scene] = score_planned_scene(params, plan, scene, wait=wait)
    ordered = [results[s] for s in plan.scenes]
    write_summary(ordered, plan.out, plan.model_uri)
    return ordered
