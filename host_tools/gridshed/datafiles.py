"""The project's data folders (boards/, meters/): one JSON file per entry, named by its stem."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

ROOT_ENV = "GRIDSHED_ROOT"


def repo_root() -> Path:
    """The folder holding boards/, meters/, scenarios/ and firmware/.

    $GRIDSHED_ROOT when set; the checkout when the package runs from one (editable install,
    tests); otherwise the copies shipped inside the installed wheel (gridshed/_data).
    """
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    checkout = here.parents[1]
    if (checkout / "boards").is_dir() and (checkout / "firmware" / "agent").is_dir():
        return checkout
    return here / "_data"


def list_entries(folder: str) -> list[str]:
    """Entry names (file stems) of a data folder, sorted."""
    d = repo_root() / folder
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def load_entry(folder: str, what: str, name: str, key: str,
               validate: Callable[[Any], list[str]]) -> dict[str, Any]:
    """Load folder/<name>.json, check it with `validate` and that its `key` matches the file
    name; any problem is one UserError naming the file."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"{what} {name!r}: not a {what} name")
    path = repo_root() / folder / f"{name}.json"
    if not path.is_file():
        known = ", ".join(list_entries(folder)) or "none"
        raise UserError(f"{what} {name!r}: no file {path} (known {folder}: {known})")
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read {what} file: {exc}") from None
    errors = validate(entry)
    if not errors and entry[key] != name:
        errors.append(f"{key}: {entry[key]!r} differs from the file name {name!r}")
    if errors:
        raise UserError(f"{path}: " + "; ".join(errors))
    return entry


def shipped(path: str | Path, folder: str) -> Path:
    """`path` as given when it exists, else the file of that name shipped in `folder` (so an
    installed CLI runs `gridshed sim ercot_ffr_dip.csv --site demo-site.toml` anywhere)."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    alt = repo_root() / folder / p.name
    return alt if alt.is_file() else p
