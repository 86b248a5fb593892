"""The file side of training checkpoints: names, the `latest` pointer, atomic publishing, pruning.

On disk::

    <save_dir>/latest                    the iteration of the newest complete checkpoint (text)
    <save_dir>/iter_0000100/             one complete checkpoint; META_FILE marks it complete
    <save_dir>/iter_0000200.tmp-<id>/    a save in progress or interrupted; never loaded

The protocol, shared by the denoiser checkpoints (`checkpoint.py`, dist_checkpointing payload) and
the VAE trainer (`vae_trainer.py`, one torch state file): write everything into a temporary folder
(`temporary_dir_name`), META_FILE last; then `publish_checkpoint` renames it to `iter_<7 digits>`
and replaces `latest` (temp file, fsync, `os.replace`). A crash at any point leaves the previous
checkpoint complete and `latest` naming it; `remove_stale_temporaries` clears what interrupted saves
left, `prune_checkpoints` keeps the newest few. Every function here runs on one rank and uses no
process group.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

META_FILE = "checkpoint_meta.json"
"""Written last into a checkpoint folder: a folder `iter_<n>` without it is not complete."""

LATEST_FILE = "latest"
"""The pointer file: the iteration of the newest complete checkpoint, as text."""

TMP_MARKER = ".tmp-"
"""In the name of every temporary folder or file of a save in progress (`iter_<n>.tmp-<id>`)."""

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iteration_dir_name(iteration: int) -> str:
    """'iter_0000100' for iteration 100."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iter_{iteration:07d}"


def temporary_dir_name(iteration: int) -> str:
    """A fresh name for the folder a save of `iteration` is written into: 'iter_0000100.tmp-<id>'."""
    return f"{iteration_dir_name(iteration)}{TMP_MARKER}{uuid.uuid4().hex[:8]}"


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Create `path`, let `write(file)` fill it, and flush it to disk before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(save_dir: str | Path) -> dict[int, Path]:
    """Published checkpoints under save_dir by iteration (temp directories excluded)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return {}
    found = {}
    for entry in save_dir.iterdir():
        match = _ITER_DIR.match(entry.name)
        if match and (entry / META_FILE).is_file():
            found[int(match.group(1))] = entry
    return found


def _read_latest(save_dir: Path) -> int | None:
    try:
        return int((save_dir / LATEST_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_latest(save_dir: str | Path, iteration: int) -> None:
    """Atomically point save_dir/latest at `iteration` (temp file, fsync, os.replace)."""
    save_dir = Path(save_dir)
    tmp = save_dir / f"{LATEST_FILE}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    write_synced(tmp, lambda f: f.write(f"{iteration}\n".encode()))
    os.replace(tmp, save_dir / LATEST_FILE)
    fsync_dir(save_dir)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that is missing, the newest complete one; None if none."""
    save_dir = Path(save_dir)
    complete = complete_checkpoints(save_dir)
    iteration = _read_latest(save_dir)
    if iteration is not None and iteration in complete:
        return complete[iteration]
    if not complete:
        return None
    newest = max(complete)
    if iteration is not None:
        logger.warning(
            "%s names iteration %d, which is not a complete checkpoint; using iteration %d",
            save_dir / LATEST_FILE,
            iteration,
            newest,
        )
    return complete[newest]


def publish_checkpoint(save_dir: str | Path, tmp_dir: str | Path, iteration: int) -> Path:
    """Rename a fully written temp directory to iter_<iteration> and point `latest` at it."""
    save_dir, tmp_dir = Path(save_dir), Path(tmp_dir)
    final = save_dir / iteration_dir_name(iteration)
    if final.exists():
        # Saving an iteration again: move the old copy aside (a temp name), then swap in the new one.
        os.rename(final, save_dir / f"{final.name}{TMP_MARKER}replaced-{uuid.uuid4().hex[:8]}")
    os.rename(tmp_dir, final)
    fsync_dir(save_dir)
    write_latest(save_dir, iteration)
    return final


def remove_stale_temporaries(save_dir: str | Path) -> list[Path]:
    """Delete temp directories and files left by interrupted saves; return what was removed."""
    removed = []
    for entry in Path(save_dir).iterdir():
        if TMP_MARKER not in entry.name:
            continue
        if not (entry.name.startswith("iter_") or entry.name.startswith(LATEST_FILE)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def prune_checkpoints(save_dir: str | Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    save_dir = Path(save_dir)
    complete = complete_checkpoints(save_dir)
    keep = set(sorted(complete)[-keep_last:])
    latest = _read_latest(save_dir)
    if latest is not None:
        keep.add(latest)
    pruned = []
    for iteration in sorted(set(complete) - keep):
        # Rename first, so that a crash mid-delete leaves only a temp directory behind.
        doomed = save_dir / f"{complete[iteration].name}{TMP_MARKER}pruned-{uuid.uuid4().hex[:8]}"
        os.rename(complete[iteration], doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        pruned.append(iteration)
    return pruned
