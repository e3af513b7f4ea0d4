"""Validate the raw dataset (tiles + labels) with the Great Expectations suites kept in ``expectations/``."""

from __future__ import annotations

import functools
import html
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from tqdm import tqdm

from geoclip.bands import ALL_BAND_NAMES
from geoclip.config import Params
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_path, write_json
from geoclip.prepare import LABELS_FILE, read_labels
from geoclip.tiles import TIFF_SUFFIXES

# Must be set before great_expectations is imported anywhere in the process.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

#: Suite JSON committed with the project (project root / expectations).
SUITES_DIR = Path(__file__).resolve().parents[1] / "expectations"
#: Offending files named per failed check in the error message (the reports list them all).
MESSAGE_FILES = 3
#: Offending files listed per check in the HTML page (a whole bad dataset would make it unreadable).
HTML_FILES = 200
TILE_COLUMNS = ["id", "path", "band_count", "dtype", "width", "height", "crs", "min", "max", "nan_count",
                "nodata_fraction", "readable", "error"]


def _read_error(exc: Exception) -> str:
    """One line saying why GDAL could not read a file (the cause is more telling than 'Read failed')."""
    text = str(exc.__cause__ or exc.__context__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@functools.lru_cache(maxsize=256)
def _crs_name(wkt: str) -> str:
    """A short CRS name ('EPSG:32632'); cached because the EPSG lookup costs as much as reading a tile."""
    return CRS.from_wkt(wkt).to_string()


def _tile_row(path: Path, nodata_value: int) -> dict:
    """Open one tile once and read it once: metadata plus value range, NaN count and nodata fraction."""
    row: dict = {"id": path.stem, "path": str(path), "readable": False, "error": None}
    try:
        with rasterio.open(path) as src:
            data = src.read()
            row.update(band_count=src.count, dtype=src.dtypes[0], width=src.width, height=src.height,
                       crs=_crs_name(src.crs.to_wkt()) if src.crs else None)
    except (RasterioError, OSError, ValueError) as exc:
        row["error"] = _read_error(exc)
        return row
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        row["nan_count"] = int(data.size - finite.sum())
        values = data[finite]
    else:
        row["nan_count"], values = 0, data
    row["min"] = float(values.min()) if values.size else None
    row["max"] = float(values.max()) if values.size else None
    row["nodata_fraction"] = float((data == nodata_value).all(axis=0).mean()) if data.size else 1.0
    row["readable"] = True
    return row


def build_tile_index(paths: list[Path], nodata_value: int) -> pd.DataFrame:
    """One row per tile (see ``TILE_COLUMNS``); a file rasterio cannot read is recorded, not raised."""
    # GDAL releases the GIL while reading, so a few threads (one dataset each) overlap I/O and decoding.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(tqdm(pool.map(lambda p: _tile_row(Path(p), nodata_value), paths), total=len(paths),
                         desc="index tiles", unit="tile"))
    return pd.DataFrame(rows, columns=TILE_COLUMNS)


def _label_paths(labels: pd.DataFrame, raw: Path) -> list[Path | None]:
    """Each label's tile path: absolute as written, else relative to the raw folder."""
    return [None if pd.isna(p) else (Path(p) if Path(p).is_absolute() else raw / p) for p in labels["path"]]


def _suite_parameters(suite: dict) -> set[str]:
    """Names of the ``{"$PARAMETER": name}`` kwargs a suite needs."""
    return {v["$PARAMETER"] for e in suite["expectations"] for v in e["kwargs"].values()
            if isinstance(v, dict) and "$PARAMETER" in v}


def _plain(value):
    """Numpy scalars and NaN to plain JSON values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():  # integer columns turn float when a row is null (unreadable tile)
            return int(value)
    return value


def run_suite(suite_path: Path, df: pd.DataFrame, parameters: dict, keys: tuple[str, ...] = ("path",)) -> dict:
    """Run one committed suite on ``df`` in an ephemeral GX context; return plain, JSON-ready results.

    ``parameters`` fills the suite's ``$PARAMETER`` kwargs; offending rows are named by the ``keys`` columns.
    """
    import great_expectations as gx  # slow import (seconds): only when validating
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_json = json.loads(Path(suite_path).read_text())
    missing = sorted(_suite_parameters(suite_json) - set(parameters))
    if missing:
        raise GeoclipError(f"{suite_path}: suite needs parameter(s) {missing}; got {sorted(parameters)}")
    name = suite_json["name"]
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # our own tqdm bar is enough
    suite = ctx.suites.add_or_update(gx.ExpectationSuite(**suite_json))
    batch = ctx.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df}, expectation_parameters=parameters,
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": list(keys)})
    checks = []
    for r in result.results:
        cfg, res, exc = r.expectation_config, r.result, r.exception_info or {}
        column = cfg.kwargs.get("column")
        offending = [{**{k: _plain(row.get(k)) for k in keys}, "value": _plain(row.get(column))}
                     for row in res.get("unexpected_index_list") or []]
        checks.append({
            "check": f"{name}.{cfg.meta['check']}", "expectation": cfg.type,
            "expected": cfg.meta.get("expected", "").format(**parameters),
            "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
            "success": bool(r.success), "observed_value": _plain(res.get("observed_value")),
            "unexpected_count": _plain(res.get("unexpected_count")), "offending": offending,
            "error": exc.get("exception_message") if exc.get("raised_exception") else None,
        })
    return {"suite": name, "suite_file": str(suite_path), "success": bool(result.success), "checks": checks}


def _bare(value) -> bool:
    """True where an offending value says nothing beyond the rule (missing, or a failed yes/no flag)."""
    return value is None or value is False


def _where(offending: dict) -> str:
    """Name an offending row: its file, else its line in labels.csv."""
    if offending.get("path") is not None:
        return str(offending["path"])
    return f"{LABELS_FILE} line {offending['line']}" if offending.get("line") is not None else "a row"


def _failure_line(check: dict) -> str:
    """One check's failure, naming up to ``MESSAGE_FILES`` offending files."""
    text = f"{check['check']} (expected {check['expected']}) failed"
    if check["error"]:
        return f"{text} with error: {check['error']}"
    if not check["offending"]:
        return f"{text}: got {check['observed_value']}"
    names = [_where(o) + ("" if _bare(o["value"]) else f" (got {o['value']})")
             for o in check["offending"][:MESSAGE_FILES]]
    more = len(check["offending"]) - MESSAGE_FILES
    return f"{text} for {', '.join(names)}" + (f" and {more} more" if more > 0 else "")


def _write_html(path: Path, report: dict) -> None:
    """A self-contained HTML page: one row per check with pass/fail and its offending files."""
    esc = html.escape
    rows = []
    for c in report["checks"]:
        status = "pass" if c["success"] else "FAIL"
        files = "".join(f"<li>{esc(_where(o))}" + ("" if _bare(o["value"]) else
                                                     f" &mdash; {esc(str(o['value']))}") + "</li>"
                        for o in c["offending"][:HTML_FILES])
        more = len(c["offending"]) - HTML_FILES
        files += f"<li>and {more} more (see validation.json)</li>" if more > 0 else ""
        detail = f"<ul>{files}</ul>" if files else esc(str(c["error"] or c["observed_value"] or ""))
        rows.append(f"<tr class='{status.lower()}'><td>{esc(c['check'])}</td><td>{esc(c['expected'])}</td>"
                    f"<td><code>{esc(c['expectation'])}</code></td><td>{status}</td>"
                    f"<td>{len(c['offending']) or ''}</td><td>{detail}</td></tr>")
    params = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in report["parameters"].items())
    verdict = "PASSED" if report["success"] else "FAILED"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>geoclip validation: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}
tr.fail td{{background:#fde2e2}}tr.pass td:nth-child(4){{color:#1a7f37}}ul{{margin:0;padding-left:1.2em}}</style>
</head><body><h1>geoclip data validation: {verdict}</h1>
<p>{esc(report.get('error', ''))}</p>
<p>{report['n_failed']} of {report['n_checks']} checks failed; {report['n_tiles']} tiles, {report['n_labels']} labels
under <code>{esc(report['raw'])}</code>. Suites: {esc(', '.join(report['suite_files']))}
(Great Expectations {esc(report['gx_version'])}).</p>
<table><tr><th>check</th><th>expected</th><th>expectation</th><th>result</th><th>offending</th><th>details</th></tr>
{''.join(rows)}</table><h2>Parameters</h2><table>{params}</table></body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def _write_reports(reports: Path, report: dict) -> None:
    """Write ``validation.json`` and ``validation.html``, each atomically."""
    write_json(reports / "validation.json", report)
    _write_html(reports / "validation.html", report)


def index_dataset(labels: pd.DataFrame, raw: Path, nodata_value: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add ``file_exists``/``line`` to the labels; index each labelled file plus any tile on disk (see ``labelled``)."""
    label_paths = _label_paths(labels, raw)
    labels = labels.assign(file_exists=[p is not None and p.is_file() for p in label_paths],
                           line=range(2, len(labels) + 2))  # line in labels.csv, after the header
    labelled = [p for p, ok in zip(label_paths, labels["file_exists"]) if ok]
    tiles_dir = raw / "tiles"
    on_disk = sorted(p for p in tiles_dir.rglob("*") if p.suffix.lower() in TIFF_SUFFIXES) if tiles_dir.is_dir() else []
    unique: dict[Path, Path] = {}
    for p in labelled + on_disk:  # each file once, however it is spelled
        unique.setdefault(p.resolve(), p)
    tiles = build_tile_index(list(unique.values()), nodata_value)
    labelled_set = {p.resolve() for p in labelled}
    tiles["labelled"] = [Path(p).resolve() in labelled_set for p in tiles["path"]]
    return labels, tiles


def validate(params: Params) -> dict:
    """Check raw tiles and labels against the suites; write JSON + HTML reports; raise GeoclipError on failure."""
    import great_expectations as gx

    raw, reports = Path(params.paths.raw), Path(params.paths.reports)
    v = params.validate
    try:
        labels = read_labels(raw)
    except GeoclipError as exc:  # still leave a report saying why nothing could be checked
        _write_reports(reports, {"success": False, "raw": str(raw), "error": str(exc), "n_tiles": 0, "n_labels": 0,
                                 "n_checks": 0, "n_failed": 0, "parameters": {}, "suite_files": [],
                                 "gx_version": gx.__version__, "checks": [], "unreadable": []})
        raise
    labels, tiles = index_dataset(labels, raw, v.nodata_value)

    parameters = {"band_count": len(ALL_BAND_NAMES), "expected_size": v.expected_size, "min_value": v.min_value,
                  "max_value": v.max_value, "max_nodata_fraction": v.max_nodata_fraction,
                  "class_names": list(params.classes.names)}
    suites = [run_suite(SUITES_DIR / "tiles.json", tiles, parameters),
              run_suite(SUITES_DIR / "labels.json", labels, parameters, keys=("path", "line"))]
    checks = [c for s in suites for c in s["checks"]]
    errors = dict(zip(tiles["path"], tiles["error"]))
    for o in (o for c in checks if c["check"] == "tiles.readable" for o in c["offending"]):
        o["value"] = _plain(errors.get(o["path"]))  # say why, not just False
    failed = [c for c in checks if not c["success"]]
    report = {"success": not failed, "raw": str(raw), "n_tiles": len(tiles), "n_labels": len(labels),
              "n_checks": len(checks), "n_failed": len(failed), "parameters": parameters,
              "suite_files": [str(Path(s["suite_file"]).relative_to(SUITES_DIR.parent)) for s in suites],
              "gx_version": gx.__version__, "checks": checks,
              "unreadable": [{"path": p, "error": errors[p]} for p in tiles["path"] if isinstance(errors[p], str)]}
    _write_reports(reports, report)
    if failed:
        raise GeoclipError(f"validation failed: {len(failed)} of {len(checks)} checks: "
                           + "; ".join(_failure_line(c) for c in failed)
                           + f" — see {reports / 'validation.html'}")
    return {"n_tiles": len(tiles), "n_labels": len(labels), "n_checks": len(checks), "success": True}
