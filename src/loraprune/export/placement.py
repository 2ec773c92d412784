"""Put a validated export in place: build it in a temporary folder beside the target, then rename.

A crash or a failed check leaves the old target untouched and no half-written folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def temporary_folder_beside(out_dir: Path) -> Path:
    """A new empty folder next to ``out_dir`` (same file system, so the final rename is atomic).

    Its name carries this process's id, so the folders of a killed export are found and removed here.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_folders(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is an ordinary folder
    return tmp


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the validated folder to `out_dir`, replacing an old one only after that worked."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(trash / out_dir.name, out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def remove_abandoned_folders(out_dir: Path) -> list[Path]:
    """Remove ``out_dir``'s temporary siblings whose writing process no longer runs; returns them."""
    removed = []
    for sibling in out_dir.parent.glob(f".{out_dir.name}.tmp-*-*"):
        owner = sibling.name[len(f".{out_dir.name}.tmp-"):].split("-", 1)[0]
        if owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
