"""Data sets in the part-feature format (SPEC §7).

:func:`synthetic` generates a seeded synthetic occluded Re-ID world; :func:`synthetic_preset`
builds the named presets in :data:`PRESETS` (``tiny``, ``demo``, ``occluded_duke``,
``occluded_reid``, ``market1501``).
"""
from orgnn.datasets.synthetic import (
    PRESETS,
    SIDES,
    band_visibility,
    part_boxes,
    synthetic,
    synthetic_preset,
)

__all__ = ["PRESETS", "SIDES", "band_visibility", "part_boxes", "synthetic", "synthetic_preset"]
