"""What a Sentinel-2 input is made of: its band files, processing level and radiometric offsets, and its mask.

One input, four forms, one :class:`Product`: a stacked raster whose band descriptions (or ``band_names``) say its
order; a folder of per-band files (``*_B02.tif``, ``*_B8A.jp2``, ``*_SCL.tif``); a SAFE product (its folder or its
``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml``); a STAC Item JSON whose assets are per-band rasters. Local paths and
``s3://`` URIs alike; only headers and metadata are read here (geoclip.data.product_reader reads the pixels).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import rasterio
from rasterio.errors import RasterioIOError

from geoclip.bands import SCL_BAND, canonical_band
from geoclip.data import s3
from geoclip.data.s3 import gdal_path
from geoclip.errors import GeoclipError

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt")
MTD_NAMES = ("MTD_MSIL1C.xml", "MTD_MSIL2A.xml")
#: ``<anything>_B02.tif``, ``T32TQM_..._B8A_20m.jp2``, ``..._SCL.tif``, ``..._mask.tif``: the band is the name's
#: last part.
BAND_FILE = re.compile(r"(?:^|[_.-])(B\d{1,2}A?|SCL|MASK)(?:_(\d+)m)?\.(?:tiff?|jp2|vrt)$", re.IGNORECASE)
MASK_SUFFIX = "_mask"  # a stacked scene's own mask file, beside it: {stem}_mask.tif, non-zero = masked
#: The MTD's band_id order (0..12) of the radiometric offsets.
MTD_BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


@dataclass(frozen=True)
class BandFile:
    """Where one band's pixels are: a GDAL path and the 1-based band index inside it."""

    path: str
    index: int = 1


@dataclass(frozen=True)
class Product:
    """A Sentinel-2 input resolved into its bands and metadata (nothing read but headers and XML/JSON)."""

    uri: str  # as the user gave it
    stem: str  # what outputs are named after
    form: str  # "stacked", "per-band", "safe" or "stac"
    bands: dict[str, BandFile]  # canonical band name -> file
    level: str = ""  # "L1C", "L2A" or "" when the input does not say
    # Per band: reflectance = (DN * gain + bias) / 10000 in the model's units (EuroSAT L1C digital numbers).
    gain: dict[str, float] = field(default_factory=dict)
    bias: dict[str, float] = field(default_factory=dict)
    mask: BandFile | None = None
    mask_kind: str = ""  # "scl" (classes) or "binary" (non-zero = masked)
    files: tuple[str, ...] = ()  # every file the pixels come from (content identity, outputs' provenance)


def _join(base: str, rel: str) -> str:
    """``rel`` (a path or URI; an absolute one stays as it is) against the folder or prefix ``base``."""
    if s3.is_s3(rel) or rel.startswith(("/", "http://", "https://")):
        return rel
    return s3.join(base, rel) if s3.is_s3(base) else str(Path(base, rel))


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if s3.is_s3(uri) else str(Path(uri).parent)


def _read_text(uri: str) -> str:
    """The text of a small local or S3 file (a manifest, an MTD, a STAC item); GeoclipError naming it otherwise."""
    if s3.is_s3(uri):
        return s3.read_text(uri)
    try:
        return Path(uri).read_text(encoding="utf-8")
    except OSError as exc:
        raise GeoclipError(f"{uri}: cannot be read ({exc.strerror})") from exc


def _list(folder: str) -> list[str]:
    """Files directly in a local folder or under an S3 prefix (any depth for S3), as paths/URIs, sorted."""
    if s3.is_s3(folder):
        return s3.list_uris(folder.rstrip("/"))
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def is_product_folder(files: list[str]) -> bool:
    """True when a folder's files make one product (an MTD, or at least two spectral per-band files) rather than
    scenes (stacked scenes with their ``_mask.tif`` files are scenes)."""
    names = [f.rsplit("/", 1)[-1] for f in files]
    bands = [m for m in map(BAND_FILE.search, names) if m and m.group(1).upper() not in ("MASK", "SCL")]
    return any(n in MTD_NAMES for n in names) or len(bands) >= 2


def resolve(uri: str, band_names: list[str] | None = None, level: str = "",
            default_order: list[str] | tuple[str, ...] = ()) -> Product:
    """The :class:`Product` of a local or ``s3://`` input, whatever its form; ``band_names`` (else ``default_order``,
    the model's input order) names an undescribed stacked raster's bands, ``level`` the processing level where the
    input does not say it."""
    uri = str(uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name in MTD_NAMES:
        product = _safe(uri)
    elif name.lower().endswith(".json"):
        product = _stac(uri)
    elif name.lower().endswith(RASTER_SUFFIXES):
        product = _stacked(uri, band_names, list(default_order))
    else:
        product = _folder(uri)
    return replace(product, uri=uri, level=product.level or level.upper())


def _level_from_name(text: str) -> str:
    m = re.search(r"MSIL(1C|2A)|\b(L1C|L2A)\b", text.upper())
    return ("L" + m.group(1)) if m and m.group(1) else (m.group(2) if m else "")


def _stacked(uri: str, band_names: list[str] | None, default_order: list[str]) -> Product:
    """A multi-band raster: bands in the order its descriptions name, else ``band_names``, else ``default_order``."""
    try:
        with rasterio.open(gdal_path(uri)) as src:
            count, descriptions, tags = src.count, src.descriptions, src.tags()
            scales, offsets = src.scales, src.offsets
    except RasterioIOError as exc:
        raise GeoclipError(f"{uri}: cannot be read as a raster ({str(exc).splitlines()[0]})") from exc
    if any(descriptions):
        names = [canonical_band(d or "") for d in descriptions]
        unknown = [d for d, n in zip(descriptions, names) if n is None]
        if unknown:
            raise GeoclipError(f"{uri}: band description(s) {unknown} are not Sentinel-2 band names (expected B1/B01 "
                               "... B12, B8A or common names such as blue, nir); set score.band_names to the file's "
                               "order instead")
        source = "band descriptions"
    elif band_names:
        names = [canonical_band(b) for b in band_names]
        if None in names:
            raise GeoclipError(f"band_names: {[b for b, n in zip(band_names, names) if n is None]} are not "
                               "Sentinel-2 band names (expected B01 ... B12, B8A or common names)")
        source = "band_names"
    elif default_order:
        names, source = list(default_order), "the model's input order (no band descriptions, no band_names)"
    else:
        raise GeoclipError(f"{uri}: its bands have no descriptions; set score.band_names to the file's band order")
    if len(names) != count:
        raise GeoclipError(f"{uri}: {count} band(s), but {source} names {len(names)}: {', '.join(names)}")
    if len(set(names)) != len(names):
        raise GeoclipError(f"{uri}: {source} name a band twice: {names}")
    bands = {n: BandFile(gdal_path(uri), i + 1) for i, n in enumerate(names)}
    # A GDAL scale/offset (reflectance = DN * scale + offset) is the file's own statement of its units.
    gain = {n: 10000 * s for n, s in zip(names, scales) if s not in (None, 1.0)}
    bias = {n: 10000 * o for n, o, s in zip(names, offsets, scales) if s not in (None, 1.0) or o}
    stem = PurePosixPath(uri.rstrip("/")).stem
    mask = _sidecar_mask(uri)
    return Product(uri, stem, "stacked", bands, _level_from_name(json.dumps(tags) + " " + stem), gain, bias,
                   mask, "binary" if mask else "", (uri,) + ((mask_uri(uri),) if mask else ()))


def mask_uri(scene_uri: str) -> str:
    """Where a stacked scene's own mask file is: ``{stem}_mask.tif`` beside it."""
    return _join(_parent(scene_uri), PurePosixPath(scene_uri.rstrip("/")).stem + MASK_SUFFIX + ".tif")


def _sidecar_mask(uri: str) -> BandFile | None:
    """A stacked scene's own mask file, when there is one."""
    path = mask_uri(uri)
    there = s3.exists(path) if s3.is_s3(path) else Path(path).is_file()
    return BandFile(gdal_path(path)) if there else None


def _folder(uri: str) -> Product:
    """A SAFE folder (it holds an MTD) or a folder of per-band files."""
    if not s3.is_s3(uri) and not Path(uri).exists():
        raise GeoclipError(f"{uri}: no such file or folder; expected a scene, a product folder or a STAC item")
    files = _list(uri)
    if not files:
        raise GeoclipError(f"{uri}: empty folder; expected a SAFE product or per-band files (*_B02.tif ...)")
    mtd = [f for f in files if f.rsplit("/", 1)[-1] in MTD_NAMES]
    if mtd:
        return _safe(min(mtd, key=len))
    if uri.rstrip("/").upper().endswith(".SAFE"):
        raise GeoclipError(f"{uri}: a .SAFE folder without {' or '.join(MTD_NAMES)}; expected a complete product")
    bands: dict[str, tuple[int, str]] = {}
    for f in files:
        m = BAND_FILE.search(f.rsplit("/", 1)[-1])
        if not m:
            continue
        band = SCL_BAND if m.group(1).upper() == "SCL" else "MASK" if m.group(1).upper() == "MASK" else \
            canonical_band(m.group(1))
        if band is None:
            raise GeoclipError(f"{f}: {m.group(1)!r} is not a Sentinel-2 band name (expected B01 ... B12, B8A, SCL)")
        res = int(m.group(2) or 0)
        if band not in bands or res < bands[band][0]:  # the finest copy of a band (L2A keeps 10, 20 and 60 m)
            bands[band] = (res, f)
    spectral = {b: BandFile(gdal_path(f)) for b, (_, f) in bands.items() if b not in (SCL_BAND, "MASK")}
    if not spectral:
        raise GeoclipError(f"{uri}: no per-band files (expected names ending _B02.tif, _B8A.jp2 ...)")
    mask = bands.get(SCL_BAND) or bands.get("MASK")
    stem = PurePosixPath(uri.rstrip("/")).name
    return Product(uri, stem, "per-band", spectral, _level_from_name(stem),
                   mask=BandFile(gdal_path(mask[1])) if mask else None,
                   mask_kind=("scl" if SCL_BAND in bands else "binary") if mask else "",
                   files=tuple(f for _, f in sorted(bands.values(), key=lambda rf: rf[1])))


def _safe(mtd_uri: str) -> Product:
    """A SAFE product from its MTD: the image files it lists (finest resolution of each band), level and offsets."""
    try:
        root = ET.fromstring(_read_text(mtd_uri))
        return _safe_from(mtd_uri, root)
    except ET.ParseError as exc:
        raise GeoclipError(f"{mtd_uri}: not a readable product metadata XML ({exc})") from exc
    except (ValueError, TypeError, IndexError) as exc:  # a band_id or quantification value that is not a number
        raise GeoclipError(f"{mtd_uri}: unexpected product metadata ({exc}); expected an ESA MTD_MSIL1C/L2A file") \
            from exc


def _safe_from(mtd_uri: str, root: ET.Element) -> Product:
    """The SAFE product described by the parsed MTD ``root``."""
    ptype = (root.findtext(".//PRODUCT_TYPE") or "").strip()
    level = {"S2MSI1C": "L1C", "S2MSI2A": "L2A"}.get(ptype) or _level_from_name(Path(mtd_uri).name)
    folder = _parent(mtd_uri)
    bands: dict[str, tuple[int, str]] = {}
    for node in root.iter("IMAGE_FILE"):
        rel = (node.text or "").strip()
        m = BAND_FILE.search(rel.rsplit("/", 1)[-1] + ".jp2")
        if not m or m.group(1).upper() == "MASK":
            continue
        band = SCL_BAND if m.group(1).upper() == "SCL" else canonical_band(m.group(1))
        res = int(m.group(2) or 0)
        if band and (band not in bands or res < bands[band][0]):
            bands[band] = (res, _join(folder, rel + ".jp2"))
    if not bands:
        raise GeoclipError(f"{mtd_uri}: lists no band image files (IMAGE_FILE); expected a complete SAFE product")
    quant = float(root.findtext(".//BOA_QUANTIFICATION_VALUE") or root.findtext(".//QUANTIFICATION_VALUE") or 10000)
    offsets = {MTD_BAND_IDS[int(n.get("band_id", -1))]: float(n.text or 0)
               for n in list(root.iter("BOA_ADD_OFFSET")) + list(root.iter("RADIO_ADD_OFFSET"))
               if 0 <= int(n.get("band_id", -1)) < len(MTD_BAND_IDS)}
    spectral = {b: BandFile(gdal_path(f)) for b, (_, f) in bands.items() if b != SCL_BAND}
    gain = {b: 10000 / quant for b in spectral} if quant != 10000 else {}
    bias = {b: offsets[b] * 10000 / quant for b in spectral if offsets.get(b)}
    scl = bands.get(SCL_BAND)
    stem = PurePosixPath(folder).name.removesuffix(".SAFE")
    return Product(mtd_uri, stem, "safe", spectral, level, gain, bias, BandFile(gdal_path(scl[1])) if scl else None,
                   "scl" if scl else "", (mtd_uri,) + tuple(sorted(f for _, f in bands.values())))


def _stac(uri: str) -> Product:
    """A STAC Item: one asset per band (named by ``eo:bands``, else by its key), ``raster:bands`` scale and offset."""
    try:
        item = json.loads(_read_text(uri))
    except json.JSONDecodeError as exc:
        raise GeoclipError(f"{uri}: not JSON ({exc.msg} at line {exc.lineno}); expected a STAC Item") from exc
    if not isinstance(item, dict) or item.get("type") != "Feature" or not isinstance(item.get("assets"), dict):
        raise GeoclipError(f"{uri}: not a STAC Item (expected \"type\": \"Feature\" with \"assets\")")
    try:
        return _stac_from(uri, item)
    except (ValueError, TypeError, IndexError, AttributeError) as exc:  # eo:bands not a list, a scale not a number
        raise GeoclipError(f"{uri}: unexpected STAC Item content ({exc}); expected eo:bands and raster:bands lists "
                           "of objects") from exc


def _stac_from(uri: str, item: dict) -> Product:
    """The product described by the STAC Item ``item``."""
    props = item.get("properties") or {}
    ptype = str(props.get("s2:product_type") or props.get("processing:level") or "")
    level = {"S2MSI1C": "L1C", "S2MSI2A": "L2A"}.get(ptype.upper(), ptype.upper() if ptype.upper() in ("L1C", "L2A")
                                                      else "") or _level_from_name(str(item.get("id", "")))
    bands: dict[str, str] = {}
    gain: dict[str, float] = {}
    bias: dict[str, float] = {}
    for key, asset in item["assets"].items():
        eo = (asset.get("eo:bands") or [{}])[0] if isinstance(asset, dict) else {}
        band = canonical_band(str(eo.get("name") or "")) or canonical_band(str(eo.get("common_name") or "")) or \
            canonical_band(key)
        if band is None or not isinstance(asset, dict):
            continue  # thumbnails, metadata, visual composites ...
        href = asset.get("href")
        if not href:
            raise GeoclipError(f"{uri}: asset {key!r} ({band}) has no href")
        bands[band] = _join(_parent(uri), str(href))
        raster = (asset.get("raster:bands") or [{}])[0]
        if band != SCL_BAND and raster.get("scale") not in (None, 1, 1.0):
            gain[band] = 10000 * float(raster["scale"])
            bias[band] = 10000 * float(raster.get("offset") or 0)
    spectral = {b: BandFile(gdal_path(h)) for b, h in bands.items() if b != SCL_BAND}
    if not spectral:
        raise GeoclipError(f"{uri}: no asset is a Sentinel-2 band (expected keys or eo:bands such as B02 or blue)")
    scl = bands.get(SCL_BAND)
    return Product(uri, str(item.get("id") or PurePosixPath(uri).stem), "stac", spectral, level, gain, bias,
                   BandFile(gdal_path(scl)) if scl else None, "scl" if scl else "",
                   (uri,) + tuple(sorted(bands.values())))


def input_stem(uri: str) -> str:
    """What an input's outputs are named after: a file's stem, a product folder's name (less ``.SAFE``), the SAFE
    folder's name for its MTD."""
    path = PurePosixPath(str(uri).rstrip("/"))
    if path.name in MTD_NAMES:
        path = path.parent
    name = path.name
    for suffix in (".SAFE", ".safe", ".json", *RASTER_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_stac_item(uri: str) -> bool:
    try:
        item = json.loads(_read_text(uri))
    except (GeoclipError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(item, dict) and item.get("type") == "Feature" and isinstance(item.get("assets"), dict)


def discover_inputs(root: str, files: list[str]) -> list[str]:
    """The inputs among ``files`` (every file below ``root``): SAFE products (their folders), folders of per-band
    files, STAC Item JSONs and stacked rasters (``*.tif``; a ``{stem}_mask.tif`` beside one is its mask), sorted."""
    rel = {f: f[len(root.rstrip("/")) + 1:] for f in files}
    if is_product_folder([f for f, r in rel.items() if "/" not in r]) and not any(
            r.rsplit("/", 1)[-1] in MTD_NAMES for r in rel.values() if "/" in r):
        return [root]  # the root itself is one product (a patch folder, a SAFE)
    folders = {}  # folder (relative) -> its files
    for f, r in rel.items():
        folders.setdefault(r.rsplit("/", 1)[0] if "/" in r else "", []).append(f)
    taken: set[str] = set()
    found = []
    safe_roots = sorted({r.rsplit("/", 1)[0] if "/" in r else "" for r in rel.values()
                         if r.rsplit("/", 1)[-1] in MTD_NAMES})
    for product_root in safe_roots:  # everything below a SAFE root (GRANULE/.../IMG_DATA ...) is that product
        found.append(_join(root, product_root) if product_root else root)
        taken |= {f for f, r in rel.items() if not product_root or r.startswith(product_root + "/")}
    for f in files:  # STAC items before per-band folders: an item's own band files beside it are the item's
        if f not in taken and f.lower().endswith(".json") and _is_stac_item(f):
            found.append(f)
            try:
                taken |= {f, *resolve(f).files}
            except GeoclipError:
                taken.add(f)  # a broken item is still an input: the scenes suite says what is wrong with it
    for folder, members in sorted(folders.items()):
        members = [f for f in members if f not in taken]
        if folder and is_product_folder(members):
            found.append(_join(root, folder))
            taken |= set(members)
    rasters = {f for f in files if f not in taken and f.lower().endswith((".tif", ".tiff"))}
    for f in sorted(rasters):
        stem = f.rsplit(".", 1)[0]
        if stem.endswith(MASK_SUFFIX) and any(r.rsplit(".", 1)[0] == stem[: -len(MASK_SUFFIX)] for r in rasters):
            continue  # a stacked scene's mask, not a scene
        found.append(f)
    return sorted(found)


def input_files(uri: str) -> list[str]:
    """Every file an input's pixels (and mask) come from, the input itself first: what its content identity
    hashes."""
    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    if name.lower().endswith((".tif", ".tiff")):
        return [str(uri)] + ([mask_uri(uri)] if _sidecar_mask(uri) else [])
    return list(resolve(uri).files)
