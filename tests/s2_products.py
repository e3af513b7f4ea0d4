"""Small Sentinel-2 input fixtures built with rasterio: per-band files at 10/20/60 m, SAFE-like products, STAC items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

#: Native resolution of each band (m); B10 only in L1C.
RES = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
       "B09": 60, "B10": 60, "B11": 20, "B12": 20}
MTD_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
SIZE_10M = 192  # 1920 m: 192 px at 10 m, 96 at 20 m, 32 at 60 m
ORIGIN = (600000.0, 5100000.0)


def band_value(band: str) -> int:
    """The constant DN a fixture band holds (distinct per band, so the order read can be checked)."""
    return 1000 + 100 * MTD_IDS.index(band)


def write_band(path: Path, band: str, value: int | None = None, driver: str = "GTiff", size_10m: int = SIZE_10M,
               origin: tuple[float, float] = ORIGIN, dtype: str = "uint16", data: np.ndarray | None = None) -> Path:
    """One band file at its native resolution covering the same 10 m extent, constant ``value`` (or ``data``)."""
    res = RES.get(band, 20)
    n = size_10m * 10 // res
    arr = np.full((n, n), band_value(band) if value is None else value, dtype) if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"QUALITY": "100", "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    with rasterio.open(path, "w", driver=driver, width=arr.shape[1], height=arr.shape[0], count=1, dtype=arr.dtype,
                       crs="EPSG:32632", transform=from_origin(*origin, res, res), **extra) as dst:
        dst.write(arr, 1)
    return path


def per_band_folder(folder: Path, bands=tuple(b for b in MTD_IDS if b != "B10"), prefix: str | None = None,
                    scl: np.ndarray | None = None, size_10m: int = SIZE_10M) -> Path:
    """A BigEarthNet-like folder: ``{prefix}_B02.tif`` ... (prefix: the folder's name) at native resolutions,
    ``size_10m`` pixels at 10 m (a multiple of 6), optionally ``_SCL.tif`` (20 m)."""
    prefix = prefix or folder.name
    for band in bands:
        write_band(folder / f"{prefix}_{band}.tif", band, size_10m=size_10m)
    if scl is not None:
        write_band(folder / f"{prefix}_SCL.tif", "SCL", data=scl.astype(np.uint8))
    return folder


def safe_product(root: Path, level: str = "L2A", baseline: str = "05.09", offset: int = -1000,
                 scl: np.ndarray | None = None, bands: tuple[str, ...] | None = None) -> Path:
    """A SAFE-like product: MTD XML (product type, baseline, quantification, offsets, image files) and one JP2 per
    band under GRANULE/<id>/IMG_DATA (L2A: R10m/R20m/R60m folders, 10 m bands also at 20 and 60 m)."""
    bands = bands or tuple(b for b in MTD_IDS if level == "L1C" or b != "B10")
    safe = root / f"S2B_MSI{level}_20240601T101559_N{baseline.replace('.', '')}_R065_T32TQM_20240601T130000.SAFE"
    granule = f"GRANULE/{level}_T32TQM_A037000_20240601T101559/IMG_DATA"
    files = []
    for band in bands:
        if level == "L1C":
            rel = f"{granule}/T32TQM_20240601T101559_{band}"
            write_band(safe / f"{rel}.jp2", band, driver="JP2OpenJPEG")
            files.append(rel)
            continue
        for res in (10, 20, 60):
            if res < RES[band]:
                continue  # L2A keeps each band at its native resolution and coarser ones
            rel = f"{granule}/R{res}m/T32TQM_20240601T101559_{band}_{res}m"
            n = SIZE_10M * 10 // res
            value = band_value(band) - offset  # what the product stores: DN - BOA_ADD_OFFSET
            write_band(safe / f"{rel}.jp2", band, driver="JP2OpenJPEG",
                       data=np.full((n, n), value if res == RES[band] else 1, np.uint16))
            files.append(rel)
    if scl is not None:
        rel = f"{granule}/R20m/T32TQM_20240601T101559_SCL_20m"
        write_band(safe / f"{rel}.jp2", "SCL", driver="JP2OpenJPEG", data=scl.astype(np.uint8))
        files.append(rel)
    kind = "S2MSI1C" if level == "L1C" else "S2MSI2A"
    tag = "RADIO_ADD_OFFSET" if level == "L1C" else "BOA_ADD_OFFSET"
    offsets = "".join(f'<{tag} band_id="{i}">{offset}</{tag}>' for i in range(13)) if offset else ""
    quant = "QUANTIFICATION_VALUE" if level == "L1C" else "BOA_QUANTIFICATION_VALUE"
    images = "".join(f"<IMAGE_FILE>{f}</IMAGE_FILE>" for f in files)
    (safe / f"MTD_MSI{level}.xml").write_text(
        f'<?xml version="1.0" encoding="UTF-8"?><n1:Level-{level[1:]}_User_Product xmlns:n1="https://psd-14.sentinel2'
        f'.eo.esa.int/PSD/User_Product_Level-{level[1:]}.xsd"><n1:General_Info><Product_Info><PRODUCT_TYPE>{kind}'
        f'</PRODUCT_TYPE><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE><Product_Organisation><Granule_List>'
        f'<Granule>{images}</Granule></Granule_List></Product_Organisation></Product_Info>'
        f'<Product_Image_Characteristics><QUANTIFICATION_VALUES_LIST><{quant} unit="none">10000</{quant}>'
        f'</QUANTIFICATION_VALUES_LIST><{tag}_VALUES_LIST>{offsets}</{tag}_VALUES_LIST>'
        f'</Product_Image_Characteristics></n1:General_Info></n1:Level-{level[1:]}_User_Product>')
    return safe


COMMON = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
          "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22"}


def stac_item(folder: Path, hrefs: dict[str, str] | None = None, scale: float = 0.0001, offset: float = -0.1,
              product_type: str = "S2MSI2A") -> Path:
    """An Earth Search-like STAC Item: assets keyed by common name with eo:bands and raster:bands (scale, offset),
    per-band COGs beside it (relative hrefs) unless ``hrefs`` gives them; plus a thumbnail asset to ignore."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = {"thumbnail": {"href": "thumb.jpg", "type": "image/jpeg", "roles": ["thumbnail"]}}
    for band, common in COMMON.items():
        href = (hrefs or {}).get(band)
        if href is None:
            write_band(folder / f"{band}.tif", band, value=band_value(band) + int(round(-offset / scale)))
            href = f"{band}.tif"
        assets[common] = {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                          "eo:bands": [{"name": band, "common_name": common}],
                          "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": scale, "offset": offset}]}
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_32TQM_20240601_0_L2A",
            "properties": {"datetime": "2024-06-01T10:15:59Z", "s2:product_type": product_type,
                           "s2:processing_baseline": "05.10"},
            "geometry": None, "links": [], "assets": assets}
    path = folder / "item.json"
    path.write_text(json.dumps(item))
    return path
