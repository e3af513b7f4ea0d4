"""Validate raw tiles, labels and scenes to score with the Great Expectations suites in ``expectations/``."""

from __future__ import annotations

import html
import json
import math
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from tqdm import tqdm

from geoclip.config import Params
from geoclip.data.docs_offline import make_offline
from geoclip.data.tiles import LABELS_FILE, TIFF_SUFFIXES, crs_name, dataset_band_names, read_labels
from geoclip.errors import GeoclipError
from geoclip.ioutils import atomic_dir, atomic_path, write_json

# Must be set before great_expectations is imported anywhere in the process.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

#: Suite JSON committed with the project (project root / expectations).
SUITES_DIR = Path(__file__).resolve().parents[2] / "expectations"
#: Offending files named per failed check in the error message (the reports list them all).
MESSAGE_FILES = 3
#: Offending files listed per check in the HTML page (a whole bad dataset would make it unreadable).
HTML_FILES = 200
#: Data Docs sites under the reports folder: one per stage, so no two DVC stages write the same output.
DOCS_SITE = "data_docs"
SCENES_SITE = "data_docs_scenes"
#: Inside a site: the GX results it was built from (one JSON per suite), so later runs can add theirs.
SITE_RESULTS = "gx_results"
SCENES_REPORT = "scenes_validation.json"
RASTER_COLUMNS = ["band_count", "band_order", "dtype", "width", "height", "crs"]
TILE_COLUMNS = ["id", "path", *RASTER_COLUMNS, "min", "max", "nonfinite_count", "nodata_fraction", "readable",
                "error"]
SCENE_COLUMNS = ["path", *RASTER_COLUMNS, "readable", "error"]
#: The most pixel bytes read from one tile: a 64 x 64 x 13 uint16 tile is 104 kB; more is a scene, not a tile.
MAX_TILE_BYTES = 64 * 2**20
# GX 1.x keeps one "current" context per process, which ValidationDefinition.run looks up: one run at a time.
_GX_LOCK = threading.RLock()


def _read_error(exc: Exception) -> str:
    """One line saying why GDAL could not read a file (the cause is more telling than 'Read failed')."""
    text = str(exc.__cause__ or exc.__context__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__



def _raster_meta(src) -> dict:
    """What the tile and scene suites check in a file's header: bands, their names, dtype, size, CRS."""
    names = src.descriptions
    return {"band_count": src.count, "dtype": src.dtypes[0], "width": src.width, "height": src.height,
            "crs": crs_name(src.crs.to_wkt()) if src.crs else None,
            # Order is checkable only where every band is named; EuroSAT_MS tiles name none (null passes).
            "band_order": ",".join(names) if names and all(names) else None}


def _pixel_bytes(src) -> int:
    """Bytes that reading every band of ``src`` would allocate, from its header."""
    try:
        itemsize = np.dtype(src.dtypes[0]).itemsize
    except TypeError:  # GDAL types numpy lacks (complex_int16): assume the widest
        itemsize = 16
    return src.width * src.height * src.count * itemsize


def _tile_row(path: Path, nodata_value: int, expected_size: int | None = None) -> dict:
    """Open one tile once: its header, then (if tile-sized) its value range, NaN/inf count and nodata fraction.

    The header decides first, so memory stays bounded whatever the file: one that is not ``expected_size`` a side
    (a whole scene dropped among the tiles, 3.1 GB of pixels for 13 x 10980 x 10980) gets its header columns only
    and is refused by the width/height rules; one over ``MAX_TILE_BYTES`` is unreadable as a tile.
    """
    row: dict = {"id": path.stem, "path": str(path), "readable": False, "error": None}
    try:
        with rasterio.open(path) as src:
            row.update(_raster_meta(src))
            if expected_size is not None and (src.width, src.height) != (expected_size, expected_size):
                row["readable"] = True  # its header is; the value columns stay null, which their rules pass
                return row
            if _pixel_bytes(src) > MAX_TILE_BYTES:
                row["error"] = (f"{_pixel_bytes(src) / 2**20:.0f} MiB of pixels, over the "
                                f"{MAX_TILE_BYTES / 2**20:.0f} MiB a tile may hold; not read")
                return row
            data = src.read()
    except (RasterioError, OSError, ValueError) as exc:
        row["error"] = _read_error(exc)
        return row
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        row["nonfinite_count"] = int(data.size - finite.sum())
        values = data[finite]
    else:
        row["nonfinite_count"], values = 0, data
    row["min"] = float(values.min()) if values.size else None
    row["max"] = float(values.max()) if values.size else None
    row["nodata_fraction"] = float((data == nodata_value).all(axis=0).mean()) if data.size else 1.0
    row["readable"] = True
    return row


def _scene_row(path: str, opener: Callable | None = None) -> dict:
    """A scene's header only (scenes are large; the scorer reads the pixels window by window), as ``opener`` (e.g.
    geoclip.data.product_reader.open_product) presents it; a plain rasterio open without one."""
    row: dict = {"path": str(path), "readable": False, "error": None}
    try:
        with (opener or rasterio.open)(path) as src:
            row.update(_raster_meta(src))
    except GeoclipError as exc:  # the reader's own one-line reason (a missing band, an implausible scale ...)
        row["error"] = str(exc).removeprefix(f"{path}: ")
        return row
    except (RasterioError, OSError, ValueError) as exc:
        row["error"] = _read_error(exc)
        return row
    row["readable"] = True
    return row


def build_tile_index(paths: list[Path], nodata_value: int, expected_size: int | None = None) -> pd.DataFrame:
    """One row per tile (see ``TILE_COLUMNS``); a file rasterio cannot read is recorded, not raised.

    Each file's header is read before its pixels, which only a tile-sized file gets read (see ``_tile_row``).
    """
    def row(path) -> dict:
        return _tile_row(Path(path), nodata_value, expected_size)

    # GDAL releases the GIL while reading, so a few threads (one dataset each) overlap I/O and decoding.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        rows = list(tqdm(pool.map(row, paths), total=len(paths), desc="index tiles", unit="tile"))
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


def _context():
    """A fresh in-memory GX context without progress bars (our own tqdm bars are enough)."""
    import great_expectations as gx  # slow import (seconds): only when validating
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_suite(suite_path: Path, df: pd.DataFrame, parameters: dict, keys: tuple[str, ...] = ("path",),
              source: str | None = None) -> dict:
    """Run one committed suite on ``df`` in an ephemeral GX context; return plain, JSON-ready results.

    ``parameters`` fills the suite's ``$PARAMETER`` kwargs; offending rows are named by the ``keys`` columns and
    table-level failures by ``source`` (the file or folder the table describes). ``gx_result`` holds GX's own
    result for :func:`publish_results`.
    """
    import great_expectations as gx

    suite_json = json.loads(Path(suite_path).read_text())
    missing = sorted(_suite_parameters(suite_json) - set(parameters))
    if missing:
        raise GeoclipError(f"{suite_path}: suite needs parameter(s) {missing}; got {sorted(parameters)}")
    name = suite_json["name"]
    with _GX_LOCK:
        ctx = _context()
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
            "error": exc.get("exception_message") if exc.get("raised_exception") else None, "source": source,
        })
    return {"suite": name, "suite_file": str(suite_path), "success": bool(result.success), "checks": checks,
            "gx_result": result.to_json_dict()}


def publish_results(suites: list[dict], reports_dir: str | Path, site: str = DOCS_SITE,
                    keep_others: bool = True) -> dict[str, str]:
    """Add :func:`run_suite` results to the GX Data Docs site ``{reports_dir}/{site}`` and rebuild it whole.

    The site shows the latest result of each suite (only these with ``keep_others=False``). It is built in a
    temporary folder and swapped in, so a failed build never leaves half a site. Returns ``{"index": path,
    suite: validation page path}``.
    """
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    target = Path(reports_dir) / site
    with _GX_LOCK:
        saved = {}
        if keep_others and (target / SITE_RESULTS).is_dir():
            saved = {p.stem: json.loads(p.read_text()) for p in sorted((target / SITE_RESULTS).glob("*.json"))}
        for s in suites:
            saved[s["suite"]] = {"suite": json.loads(Path(s["suite_file"]).read_text()), "result": s["gx_result"]}
        with atomic_dir(target) as tmp:
            ctx = _context()
            ctx.variables.data_docs_sites = {site: {
                "class_name": "SiteBuilder", "show_how_to_buttons": False,
                # GX refuses a relative base_directory (reports/ is relative in params.yaml)
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(tmp).resolve())}}}
            for name, item in saved.items():
                ctx.suites.add_or_update(gx.ExpectationSuite(**item["suite"]))
                result = ExpectationSuiteValidationResultSchema().load(item["result"])
                run_id = result.meta.get("run_id")
                suite_id = ExpectationSuiteIdentifier(name=name)
                key = ValidationResultIdentifier(suite_id, RunIdentifier(**run_id) if isinstance(run_id, dict)
                                                 else run_id, name)
                ctx.validation_results_store.store_validation_results(result, key, suite_id)
                write_json(tmp / SITE_RESULTS / f"{name}.json", item)
            ctx.build_data_docs(site_names=[site])
            # GX links its CSS and JS from CDNs: the site must render with no network.
            remote = make_offline(tmp)
            if remote:  # a GX upgrade that links an asset with no vendored copy: the page still needs the network
                print(f"Data Docs: no local copy of {', '.join(remote)} (geoclip/data/docs_offline.py CDN_ASSETS)",
                      file=sys.stderr)
            pages = {name: page.relative_to(tmp) for name in saved
                     for page in sorted((tmp / "validations" / name).rglob("*.html"))[:1]}
    return {"index": str(target / "index.html"), **{name: str(target / rel) for name, rel in pages.items()}}


def _bare(value) -> bool:
    """True where an offending value says nothing beyond the rule (missing, or a failed yes/no flag)."""
    return value is None or value is False


def _where(offending: dict) -> str:
    """Name an offending row: its file, else its line in labels.csv, else its key columns."""
    if offending.get("path") is not None:
        return str(offending["path"])
    if offending.get("line") is not None:
        return f"{LABELS_FILE} line {offending['line']}"
    keys = [f"{k} {v}" for k, v in offending.items() if k != "value" and v is not None]
    return " ".join(keys) or "a row"  # other key columns, e.g. "class Forest split val"


def failure_line(check: dict) -> str:
    """One check's failure, naming up to ``MESSAGE_FILES`` offending files (or the table's source file)."""
    text = f"{check['check']} (expected {check['expected']}) failed"
    if check["error"]:
        return f"{text} with error: {check['error']}"
    if not check["offending"]:
        source = check.get("source")
        return f"{text} for {source} (got {check['observed_value']})" if source else \
            f"{text}: got {check['observed_value']}"
    names = [_where(o) + ("" if _bare(o["value"]) else f" (got {o['value']})")
             for o in check["offending"][:MESSAGE_FILES]]
    more = len(check["offending"]) - MESSAGE_FILES
    return f"{text} for {', '.join(names)}" + (f" and {more} more" if more > 0 else "")


_failure_line = failure_line  # the earlier private name


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
    docs = "".join(f"<li><a href='{esc(os.path.relpath(p, path.parent))}'>{esc(k)}</a></li>"
                   for k, p in report.get("data_docs", {}).items())
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
{''.join(rows)}</table><h2>Great Expectations Data Docs</h2><ul>{docs}</ul>
<h2>Parameters</h2><table>{params}</table></body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def _write_reports(reports: Path, report: dict) -> None:
    """Write ``validation.json`` and ``validation.html``, each atomically."""
    write_json(reports / "validation.json", report)
    _write_html(reports / "validation.html", report)



def index_dataset(labels: pd.DataFrame, raw: Path, nodata_value: int,
                  expected_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add ``file_exists``/``line`` to the labels; index each labelled file plus any tile on disk (see ``labelled``).

    Only files of ``expected_size`` have their pixels read (see :func:`build_tile_index`).
    """
    label_paths = _label_paths(labels, raw)
    labels = labels.assign(file_exists=[p is not None and p.is_file() for p in label_paths],
                           line=range(2, len(labels) + 2))  # line in labels.csv, after the header
    labelled = [p for p, ok in zip(label_paths, labels["file_exists"]) if ok]
    tiles_dir = raw / "tiles"
    on_disk = sorted(p for p in tiles_dir.rglob("*") if p.suffix.lower() in TIFF_SUFFIXES) if tiles_dir.is_dir() else []
    unique: dict[Path, Path] = {}
    for p in labelled + on_disk:  # each file once, however it is spelled
        unique.setdefault(p.resolve(), p)
    tiles = build_tile_index(list(unique.values()), nodata_value, expected_size)
    labelled_set = {p.resolve() for p in labelled}
    tiles["labelled"] = [Path(p).resolve() in labelled_set for p in tiles["path"]]
    return labels, tiles


def class_counts(labels: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Labelled tiles per class of the vocabulary, zeros included (the ``classes`` suite's table)."""
    counts = labels["class"].value_counts()
    return pd.DataFrame({"class": list(class_names), "n_tiles": [int(counts.get(c, 0)) for c in class_names]})


def _explain_unreadable(checks: list[dict], rule: str, errors: dict) -> None:
    """Say why each unreadable file failed, not just False."""
    for o in (o for c in checks if c["check"] == rule for o in c["offending"]):
        o["value"] = _plain(errors.get(o["path"]))


def validate(params: Params) -> dict:
    """Check raw tiles and labels against the suites; write JSON, HTML and Data Docs; raise GeoclipError on failure."""
    import great_expectations as gx

    raw, reports = Path(params.paths.raw), Path(params.paths.reports)
    v = params.validate
    try:
        labels = read_labels(raw)
    except GeoclipError as exc:  # still leave a report saying why nothing could be checked
        docs = publish_results([], reports, keep_others=False)  # and no earlier site claiming success
        _write_reports(reports, {"success": False, "raw": str(raw), "error": str(exc), "n_tiles": 0, "n_labels": 0,
                                 "n_checks": 0, "n_failed": 0, "parameters": {}, "suite_files": [],
                                 "gx_version": gx.__version__, "checks": [], "unreadable": [], "data_docs": docs})
        raise
    labels, tiles = index_dataset(labels, raw, v.nodata_value, v.expected_size)

    band_names = dataset_band_names(raw, params.ingest.band_names)
    parameters = {"band_count": len(band_names), "band_order": [",".join(band_names)],
                  "expected_size": v.expected_size, "min_value": v.min_value, "max_value": v.max_value,
                  "max_nodata_fraction": v.max_nodata_fraction, "class_names": list(params.classes.names),
                  "vocabulary": [*params.classes.names, *params.classes.concepts],
                  "min_tiles_per_class": v.min_tiles_per_class}
    labels_file = str(raw / LABELS_FILE)
    suites = [run_suite(SUITES_DIR / "tiles.json", tiles, parameters, source=str(raw / "tiles")),
              run_suite(SUITES_DIR / "labels.json", labels, parameters, keys=("path", "line"), source=labels_file),
              run_suite(SUITES_DIR / "classes.json", class_counts(labels, params.classes.names), parameters,
                        keys=("class",), source=labels_file)]
    checks = [c for s in suites for c in s["checks"]]
    errors = dict(zip(tiles["path"], tiles["error"]))
    _explain_unreadable(checks, "tiles.readable", errors)
    failed = [c for c in checks if not c["success"]]
    report = {"success": not failed, "raw": str(raw), "n_tiles": len(tiles), "n_labels": len(labels),
              "n_checks": len(checks), "n_failed": len(failed), "parameters": parameters,
              "suite_files": [str(Path(s["suite_file"]).relative_to(SUITES_DIR.parent)) for s in suites],
              "gx_version": gx.__version__, "checks": checks,
              "unreadable": [{"path": p, "error": errors[p]} for p in tiles["path"] if isinstance(errors[p], str)],
              "data_docs": publish_results(suites, reports, keep_others=False)}
    _write_reports(reports, report)
    if failed:
        raise GeoclipError(f"validation failed: {len(failed)} of {len(checks)} checks: "
                           + "; ".join(failure_line(c) for c in failed)
                           + f" — see {reports / 'validation.html'}")
    return {"n_tiles": len(tiles), "n_labels": len(labels), "n_checks": len(checks), "success": True,
            "data_docs": report["data_docs"]["index"]}


def validate_scenes(paths: list[str | Path], band_count: int, window: int, reports_dir: str | Path | None = None,
                    names: list[str] | None = None, dtype: str = "uint16", opener: Callable | None = None) -> dict:
    """Check scenes before scoring (``scenes`` suite): readable, the model's band count, CRS, one window, dtype.

    ``names`` (e.g. the s3:// URIs of downloaded copies) name the files in messages. With ``reports_dir``, write
    ``scenes_validation.json`` and the ``data_docs_scenes`` site there. Raises GeoclipError on any failure.
    """
    df = pd.DataFrame([_scene_row(str(p), opener) for p in paths], columns=SCENE_COLUMNS)
    if names is not None:
        df["path"] = [str(n) for n in names]
    parameters = {"band_count": band_count, "window": window, "dtypes": [dtype]}
    suite = run_suite(SUITES_DIR / "scenes.json", df, parameters)
    _explain_unreadable(suite["checks"], "scenes.readable", dict(zip(df["path"], df["error"])))
    failed = [c for c in suite["checks"] if not c["success"]]
    report = {"success": not failed, "scenes": list(df["path"]), "n_checks": len(suite["checks"]),
              "n_failed": len(failed), "parameters": parameters, "checks": suite["checks"],
              "suite_files": [str(Path(suite["suite_file"]).relative_to(SUITES_DIR.parent))]}
    where = ""
    if reports_dir is not None:
        report["data_docs"] = publish_results([suite], reports_dir, site=SCENES_SITE, keep_others=False)
        write_json(Path(reports_dir) / SCENES_REPORT, report)
        where = f" — see {Path(reports_dir) / SCENES_REPORT}"
    if failed:
        raise GeoclipError("scene validation failed: " + "; ".join(failure_line(c) for c in failed) + where)
    return report
