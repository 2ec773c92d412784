"""Whether a folder can be created where the user asked, checked before any model is loaded.

Permission bits say little (root may write anywhere but /proc, /sys or an immutable folder), so
the check makes and removes an empty folder in the nearest existing parent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from loraprune.errors import LoraPruneError


def check_creatable(folder: Path, flag: str = "--out") -> None:
    """Raise LoraPruneError, naming ``flag``, if ``folder`` (and its siblings) cannot be created."""
    parent = Path(os.path.abspath(folder)).parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise LoraPruneError(f"cannot create {folder}: {parent} is a file, not a folder; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".loraprune-write-test-", dir=parent))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise LoraPruneError(f"cannot create {folder} in {parent} ({reason}); choose another {flag}") from None
