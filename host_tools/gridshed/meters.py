"""The meter library (meters/<model>.json): load, list, and build register images from values.

Validation and encoding are agent.meter's (the firmware's own code): the simulator's register
image is made by the same data-driven encoder whose inverse the board runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import meter_check as fwmeter
from agent.meter_encode import MeterMap

from .datafiles import list_entries, load_entry, repo_root
from .errors import UserError

LIBRARY_REQUIRED = ("title", "source", "confidence")


def meters_dir() -> Path:
    return repo_root() / "meters"


def list_meters() -> list[str]:
    """Model names of the library (sorted file stems)."""
    return list_entries("meters")


def validate_meter(m: Any) -> list[str]:
    """agent.meter_check.validate plus what a library entry must carry (title, source, confidence)."""
    errors = list(fwmeter.validate(m))
    if isinstance(m, dict):
        for k in LIBRARY_REQUIRED:
            if k not in m:
                errors.append(f"{k}: missing (every library map says where it comes from)")
    return errors


def load_meter(model: str) -> dict[str, Any]:
    """Meter map dict by model name; UserError if missing or invalid."""
    return load_entry("meters", "meter", model, "model", validate_meter)


def register_image(m: dict[str, Any] | MeterMap, values: dict[str, float]) -> dict[int, int]:
    """{quantity: value} -> {address: u16 word}, encoded with agent.meter (the firmware's code).

    Quantities of the map not in `values` are left out; a name the map lacks is an error.
    """
    mm = m if isinstance(m, MeterMap) else MeterMap(m)
    image: dict[int, int] = {}
    for name, value in values.items():
        if not mm.has(name):
            raise UserError(f"meter {mm.model}: has no quantity {name!r} (has {', '.join(mm.names)})")
        addr, _ = mm.span(name)
        try:
            words = mm.encode(name, value)
        except (ValueError, OverflowError) as exc:
            raise UserError(f"meter {mm.model}: {name} = {value!r}: {exc}") from None
        for i, w in enumerate(words):
            image[addr + i] = w
    return image


def image_blocks(image: dict[int, int], m: dict[str, Any] | MeterMap,
                 fill: int = 0) -> list[tuple[int, list[int]]]:
    """Contiguous register blocks covering every read of the map's full plan (holes = fill).

    Meters answer reads that span the holes between quantities; a server built from these blocks
    does too. Returns [(start, [u16, ...])] sorted by start.
    """
    mm = m if isinstance(m, MeterMap) else MeterMap(m)
    spans = [(s, s + c) for s, c in mm.full_plan]
    spans += [(a, a + 1) for a in image]
    spans.sort()
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, [image.get(a, fill) for a in range(s, e)]) for s, e in merged]
