"""Tests for geoclip.bands: band and class metadata as data."""

import pytest

from geoclip.bands import (
    ALL_BAND_NAMES,
    BAND_GSD_M,
    BAND_WAVELENGTH_NM,
    EUROSAT_CLASS_DESCRIPTIONS,
    EUROSAT_CLASSES,
    RGB_BANDS,
    band_indices,
)


def test_eurosat_band_order_puts_b8a_last():
    assert len(ALL_BAND_NAMES) == 13 and ALL_BAND_NAMES[7] == "B08" and ALL_BAND_NAMES[-1] == "B8A"
    assert set(BAND_WAVELENGTH_NM) == set(BAND_GSD_M) == set(ALL_BAND_NAMES)


def test_rgb_indices():
    assert band_indices(RGB_BANDS) == [3, 2, 1]


def test_unknown_band_is_named():
    with pytest.raises(ValueError, match=r"unknown band name\(s\) \['B13'\]"):
        band_indices(["B02", "B13"])


def test_every_class_has_a_description():
    assert len(EUROSAT_CLASSES) == 10 and set(EUROSAT_CLASS_DESCRIPTIONS) == set(EUROSAT_CLASSES)
