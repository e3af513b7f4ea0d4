"""Confinement resolves links: manifest rows, tile folders and scene folders are judged where symbolic links lead, so a
link to a file elsewhere is refused like a path outside, unless the section's ``allow_outside_paths`` is true."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from factories import make_tile

import geoclip.scoring.runs
from geoclip.config import params_from_dict
from geoclip.data.confine import leaves
from geoclip.data.ingest import ingest
from geoclip.data.tiles import walk_files
from geoclip.errors import GeoclipError
from geoclip.scoring.runs import plan_scoring
from geoclip.scoring.score import list_scenes

CLASSES = ["Forest", "River"]


def tile(path: Path, value: int = 1) -> Path:
    """A small 13-band uint16 GeoTIFF (``value`` everywhere: tiles of another value are other pixels)."""
    return make_tile(path, np.full((13, 8, 8), value, "uint16"))


def link(path: Path, target: Path | str) -> Path:
    """A symbolic link at ``path`` to ``target`` (relative targets stay relative, as ``ln -s`` writes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def ingest_params(tmp_path: Path, source: Path, allow: bool = False):
    """Params that ingest ``source`` into ``tmp_path/data/raw``, links outside allowed or not."""
    return params_from_dict({"classes": {"names": CLASSES}, "paths": {"raw": str(tmp_path / "data" / "raw")},
                             "ingest": {"source": str(source), "workers": 1, "allow_outside_paths": allow}})


def refused(call) -> str:
    """The one-line GeoclipError ``call()`` raises."""
    with pytest.raises(GeoclipError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


# Manifest rows.

@pytest.mark.parametrize("through", ["tile", "folder"])
def test_a_manifest_row_linked_outside_is_refused_unless_allowed(tmp_path, through):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    tile(src / "t" / "tile_0.tif")
    secret = tile(elsewhere / "secret.tif", value=2)
    if through == "tile":
        row, how = "t/link.tif", f"a link to {secret.resolve()}"
        link(src / "t" / "link.tif", secret)
    else:
        row, how = "sub/secret.tif", f"in sub, a link to {elsewhere.resolve()}"
        link(src / "sub", elsewhere)
    pd.DataFrame({"id": ["f1", "r1"], "path": ["t/tile_0.tif", row], "class": CLASSES}).to_csv(src / "m.csv",
                                                                                            index=False)
    msg = refused(lambda: ingest(ingest_params(tmp_path, src / "m.csv")))
    assert msg == (f"{src / 'm.csv'}: row 2 (id r1, path {row}) is {how}, outside the manifest's folder {src}; "
                   f"expected tiles inside it (set ingest.allow_outside_paths: true to allow other places)")
    assert not (tmp_path / "data" / "raw").exists()
    assert ingest(ingest_params(tmp_path, src / "m.csv", allow=True))["n_tiles"] == 2


def test_manifest_links_that_stay_inside_are_ingested(tmp_path):
    real = tmp_path / "real"
    tile(real / "t" / "tile_0.tif")
    tile(real / "store" / "tile_1.tif", value=2)
    link(real / "t" / "link.tif", "../store/tile_1.tif")  # a link to another file inside the folder
    pd.DataFrame({"id": ["f1", "r1"], "path": ["t/tile_0.tif", "t/link.tif"], "class": CLASSES}).to_csv(
        real / "m.csv", index=False)
    src = link(tmp_path / "src", real)  # the manifest's own folder reached through a link: still its folder
    assert ingest(ingest_params(tmp_path, src / "m.csv"))["n_tiles"] == 2


# Tile folders.

@pytest.mark.parametrize("through", ["tile", "class folder"])
def test_a_tile_folder_link_leading_outside_is_refused_unless_allowed(tmp_path, through):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    tile(src / "Forest" / "Forest_1.tif")
    river = tile(elsewhere / "River" / "River_1.tif", value=2)
    if through == "tile":
        how = f"a link to {river.resolve()}"
        link(src / "River" / "River_1.tif", river)
    else:
        how = f"in River, a link to {river.parent.resolve()}"
        link(src / "River", elsewhere / "River")
    msg = refused(lambda: ingest(ingest_params(tmp_path, src)))
    assert msg == (f"{src}: River/River_1.tif is {how}, outside this folder; expected tiles inside it "
                   f"(set ingest.allow_outside_paths: true to allow other places)")
    assert not (tmp_path / "data" / "raw").exists()
    assert ingest(ingest_params(tmp_path, src, allow=True))["n_tiles"] == 2
    labels = pd.read_csv(tmp_path / "data" / "raw" / "labels.csv")
    assert sorted(labels["id"]) == ["Forest_1", "River_1"]


def test_tile_folder_links_that_stay_inside_are_ingested(tmp_path):
    src = tmp_path / "src"
    tile(src / "Forest" / "Forest_1.tif")
    tile(src / ".store" / "Forest_2.tif", value=2)  # a hidden folder: its own files are no tiles
    tile(src / ".store" / "River" / "River_1.tif", value=3)
    link(src / "Forest" / "Forest_2.tif", "../.store/Forest_2.tif")
    link(src / "River", ".store/River")
    link(src / "Forest" / "again", "..")  # a loop of links is walked once
    assert ingest(ingest_params(tmp_path, src))["n_tiles"] == 3
    labels = pd.read_csv(tmp_path / "data" / "raw" / "labels.csv")
    assert sorted(labels["id"]) == ["Forest_1", "Forest_2", "River_1"]


def test_a_source_linked_into_paths_raw_is_still_refused(tmp_path):
    tile(tmp_path / "data" / "raw" / "tiles" / "Forest" / "Forest_1.tif")
    src = link(tmp_path / "downloads", tmp_path / "data" / "raw" / "tiles")  # outside raw as written, inside it really
    msg = refused(lambda: ingest(ingest_params(tmp_path, src, allow=True)))
    assert msg.startswith(f"ingest.source: {src} is inside paths.raw ({tmp_path / 'data' / 'raw'}), which ingest "
                          f"replaces")


# Scene folders.

@pytest.mark.parametrize("through", ["scene", "folder"])
def test_a_scene_linked_outside_is_refused_unless_allowed(tmp_path, through):
    scenes, elsewhere = tmp_path / "scenes", tmp_path / "elsewhere"
    tile(scenes / "a.tif")
    scene = tile(elsewhere / "2024" / "T32UQD.tif")
    if through == "scene":
        how = f"a link to {scene.resolve()}"
        link(scenes / "2024" / "T32UQD.tif", scene)
    else:
        how = f"in 2024, a link to {scene.parent.resolve()}"
        link(scenes / "2024", scene.parent)
    msg = refused(lambda: list_scenes(scenes))
    assert msg == (f"{scenes}: 2024/T32UQD.tif is {how}, outside this folder; expected scenes inside it "
                   f"(set score.allow_outside_paths: true to allow other places)")
    assert list_scenes(scenes, allow_outside=True) == [str(scenes / "2024" / "T32UQD.tif"), str(scenes / "a.tif")]


def test_scoring_plans_list_scenes_with_score_allow_outside_paths(tmp_path, monkeypatch):
    scenes = tmp_path / "scenes"
    link(scenes / "b.tif", tile(tmp_path / "elsewhere" / "b.tif"))
    section = {"scenes": str(scenes)}
    msg = refused(lambda: plan_scoring(params_from_dict({"score": section})))
    assert msg.startswith(f"{scenes}: b.tif is a link to ") and "score.allow_outside_paths" in msg

    class Listed(Exception):
        """Raised right after the scenes are listed: what follows needs a registered model."""

    def stop(score):
        raise Listed

    monkeypatch.setattr(geoclip.scoring.runs, "class_request", stop)
    with pytest.raises(Listed):
        plan_scoring(params_from_dict({"score": section | {"allow_outside_paths": True}}))


def test_scene_links_that_stay_inside_name_a_listed_scene_once_or_hide_and_are_skipped(tmp_path):
    scenes = tmp_path / "scenes"
    tile(scenes / "2024" / "T32UQD.tif")
    link(scenes / "latest.tif", "2024/T32UQD.tif")  # inside: a second name for a scene there, scored once
    link(scenes / "current", "2024")  # a second name for the folder: its scenes too
    tile(scenes / "other" / "b.tif")
    link(scenes / "b_link.tif", "other/b.tif")
    link(scenes / "_staging" / "x.tif", tile(tmp_path / "elsewhere" / "x.tif"))  # skipped folders are not judged
    assert list_scenes(scenes) == [str(scenes / "2024" / "T32UQD.tif"), str(scenes / "other" / "b.tif")]


# The helpers.

def test_walk_files_follows_folder_links_and_ends_loops(tmp_path):
    root = tmp_path / "root"
    tile(root / "a" / "x.tif")
    tile(tmp_path / "side" / "y.tif")
    link(root / "b", "a")
    link(root / "a" / "self", ".")
    link(root / "up", "..")  # tmp_path: side/ is walked, root/ (already being walked) is not
    link(root / "dangling.tif", "nowhere.tif")
    found = [p.relative_to(root).as_posix() for p in walk_files(root)]
    assert found == ["a/x.tif", "b/x.tif", "dangling.tif", "up/side/y.tif"]


def test_leaves_names_the_first_link_that_leads_out(tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    (out / "deep").mkdir(parents=True)
    link(base / "in", out)
    assert leaves(base / "in" / "deep" / "t.tif", base) == f"in in, a link to {out.resolve()}, outside"
    assert leaves(base / "x" / ".." / ".." / "t.tif", base) == "outside"
    assert leaves(base / "t.tif", base) is None
    assert leaves("s3://b/p/t.tif", "s3://b/p") is None
    assert leaves("s3://b/p/../q/t.tif", "s3://b/p") == "outside"
    assert leaves(str(base / "t.tif"), "s3://b/p") == "outside"
