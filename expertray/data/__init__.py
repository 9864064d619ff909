"""Data shipped inside the package: measured per-expert routing counts on C4 (source and license in
README.md beside this file)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from expertray.errors import ConfigError

COUNTS_ENV = "EXPERTRAY_COUNTS_FILE"
COUNTS_NAME = "expert_counts_c4.json"


def counts_file() -> Path:
    """The measured C4 expert counts: $EXPERTRAY_COUNTS_FILE when set, else the copy in this package.

    The file maps model ("olmoe_c4": 64 experts, "mixtral_c4": 8) → {"layers": [3 measured layers],
    "counts": [[E per-expert counts] per measured layer]}. A missing file is an error, never a skip.
    """
    override = os.environ.get(COUNTS_ENV)
    # setuptools installs package data as plain files, so the shipped resource is a real path
    path = Path(override) if override else Path(str(resources.files(__name__).joinpath(COUNTS_NAME)))
    if not path.is_file():
        source = f"${COUNTS_ENV}" if override else "the expertray package (reinstall it)"
        raise ConfigError(f"expert counts file {path} (from {source}) does not exist")
    return path
