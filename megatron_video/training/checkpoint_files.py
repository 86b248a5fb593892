"""The file side of training checkpoints: names, the `latest` pointer, atomic publishing, pruning.

On disk::

    <save_dir>/run.lock                  held by the one run that writes this folder (SaveDirLock)
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

Sharing: `SaveDirLock` lets one run at a time write a save dir (two runs pointed at one folder would
publish over and prune each other's checkpoints). Space: `check_free_space` refuses a save that
would not fit, judged by the size of the last checkpoint, before anything is written;
`describe_write_error` turns a full disk met during a write into a message with the folder and sizes.

Integrity: `write_meta_file` records the size and blake2b digest of every other file of the folder
in META_FILE (`checksums`) and flushes files and folder before the rename. `verify_checkpoint` gives a
folder's state (ok / corrupt / incomplete / no checksums, the last for checkpoints written before
checksums existed); `good_checkpoint` picks the newest one that verifies, falling back over bad ones
with a warning naming the file, or refusing where the caller asked for exactly one checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

META_FILE = "checkpoint_meta.json"
"""Written last into a checkpoint folder: a folder `iter_<n>` without it is not complete."""

LATEST_FILE = "latest"
"""The pointer file: the iteration of the newest complete checkpoint, as text."""

TMP_MARKER = ".tmp-"
"""In the name of every temporary folder or file of a save in progress (`iter_<n>.tmp-<id>`)."""

LOCK_FILE = "run.lock"
"""Held (flock) by the run that writes the save dir; names its host, process and start time."""

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
    return {i: folder for i, folder in checkpoint_folders(save_dir).items() if (folder / META_FILE).is_file()}


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
    for path, thread in list(_deletions.items()):
        if not thread.is_alive():
            _deletions.pop(path, None)
    removed = []
    for entry in Path(save_dir).iterdir():
        if TMP_MARKER not in entry.name or entry in _deletions:  # being deleted already
            continue
        if not (entry.name.startswith("iter_") or entry.name.startswith(LATEST_FILE)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def prune_checkpoints(save_dir: str | Path, keep_last: int, in_background: bool = False) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names).

    Each is renamed to a temporary name first (so a crash mid-delete leaves only a temporary folder);
    with `in_background` the files are then deleted by a thread while the caller goes on (a full
    checkpoint can take seconds to delete); `check_free_space` waits for those deletions when it
    needs their space.
    """
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
        doomed = save_dir / f"{complete[iteration].name}{TMP_MARKER}pruned-{uuid.uuid4().hex[:8]}"
        os.rename(complete[iteration], doomed)
        if in_background:
            _delete_in_background(doomed)
        else:
            shutil.rmtree(doomed, ignore_errors=True)
        pruned.append(iteration)
    return pruned


_deletions: dict[Path, threading.Thread] = {}
"""Folders this process is deleting in the background."""


def _delete_in_background(path: Path) -> None:
    thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, daemon=True)
    _deletions[path] = thread
    thread.start()


def wait_for_deletions() -> None:
    """Block until this process's background deletions are done."""
    for path, thread in list(_deletions.items()):
        thread.join()
        _deletions.pop(path, None)


# -- integrity: checksums at save, verification at load ---------------------------------------------

CHECKSUM_ALGORITHM = "blake2b"
_CHUNK_BYTES = 8 << 20


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint that fails verification (or a save dir without one that does); names file and fault."""


def file_checksum(path: str | Path) -> str:
    """blake2b hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != META_FILE
    )


def fsync_files(folder: str | Path, only: Callable[[str], bool] | None = None) -> None:
    """Flush the files under `folder` (those whose relative path `only` accepts) and its folders."""
    folder = Path(folder)
    for path in _data_files(folder):
        if only is None or only(path.relative_to(folder).as_posix()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(sub)
    fsync_dir(folder)


def file_entries(folder: str | Path, only: Callable[[str], bool] | None = None) -> dict[str, dict]:
    """Relative path -> {"size", "digest"} of the files under `folder` that `only` accepts (all by default)."""
    folder = Path(folder)
    entries = {}
    for path in _data_files(folder):
        name = path.relative_to(folder).as_posix()
        if only is None or only(name):
            entries[name] = {"size": path.stat().st_size, "digest": file_checksum(path)}
    return entries


def write_meta_file(folder: str | Path, meta: dict, hashed: dict[str, dict] | None = None) -> dict:
    """Hash every file of `folder`, write META_FILE with the checksums, and flush it all to disk.

    `hashed`: entries (`file_entries`) other ranks computed for the files they wrote; the rest are
    hashed here. Call it last, when every rank's files exist: META_FILE marks the folder complete.
    """
    folder = Path(folder)
    hashed = dict(hashed or {})
    meta = dict(meta)
    meta["checksum_algorithm"] = CHECKSUM_ALGORITHM
    meta["checksums"] = {**file_entries(folder, only=lambda name: name not in hashed), **hashed}
    fsync_files(folder)
    write_synced(folder / META_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    fsync_dir(folder)
    return meta


@dataclass
class CheckpointStatus:
    """What `verify_checkpoint` found: state is 'ok', 'no checksums', 'corrupt' or 'incomplete'."""

    path: Path
    state: str
    problems: list[str] = field(default_factory=list)

    @property
    def loadable(self) -> bool:
        """ok, or written before checksums existed (loaded with a warning)."""
        return self.state in ("ok", "no checksums")

    def describe(self) -> str:
        """'iter_0000100: corrupt (__0_0.distcp: checksum mismatch)'."""
        detail = f" ({'; '.join(self.problems)})" if self.problems else ""
        return f"{self.path.name}: {self.state}{detail}"


def verify_checkpoint(
    folder: str | Path, extra_check: Callable[[Path], list[str]] | None = None
) -> CheckpointStatus:
    """Check every file of a checkpoint folder against META_FILE's checksums (then `extra_check`).

    `extra_check(folder)` returns problems of the payload (a format-specific reader's check); it may
    raise to refuse a folder outright. A folder without META_FILE is incomplete.
    """
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        return CheckpointStatus(folder, "incomplete", [f"{META_FILE}: missing (the save did not finish)"])
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return CheckpointStatus(folder, "corrupt", [f"{META_FILE}: unreadable ({exc})"])
    problems = []
    checksums = meta.get("checksums") if isinstance(meta, dict) else None
    if isinstance(checksums, dict):
        for name, expected in sorted(checksums.items()):
            path = folder / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif path.stat().st_size != expected["size"]:
                problems.append(
                    f"{name}: {path.stat().st_size} bytes, {expected['size']} written (truncated or altered)"
                )
            elif file_checksum(path) != expected["digest"]:
                problems.append(f"{name}: checksum mismatch (the content changed after the save)")
    if not problems and extra_check is not None:
        problems = extra_check(folder)
    if problems:
        return CheckpointStatus(folder, "corrupt", problems)
    return CheckpointStatus(folder, "ok" if isinstance(checksums, dict) else "no checksums")


def checkpoint_folders(save_dir: str | Path) -> dict[int, Path]:
    """Every iter_<n> folder under save_dir by iteration, complete or not (temporaries excluded)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return {}
    found = {}
    for entry in save_dir.iterdir():
        match = _ITER_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether `path` names one checkpoint (an iter_<n> folder, or any folder holding META_FILE)."""
    path = Path(path)
    return (path / META_FILE).is_file() or bool(_ITER_DIR.match(path.name))


def _checked(status: CheckpointStatus) -> Path:
    if status.state == "no checksums":
        logger.warning(
            "checkpoint %s has no checksums (written before they existed): loading it unverified", status.path
        )
    return status.path


def good_checkpoint(
    load_dir: str | Path,
    iteration: int | None = None,
    fall_back: bool = True,
    extra_check: Callable[[Path], list[str]] | None = None,
) -> Path | None:
    """The checkpoint to load from `load_dir`, verified; None when the save dir holds none.

    One checkpoint folder (or `iteration`'s) is taken or refused: CheckpointIntegrityError names the
    file and the fault. A save dir gives the one `latest` names when it verifies; otherwise, with
    `fall_back`, the newest one that does, after a warning naming what is wrong with each skipped
    one (without `fall_back`, or when none verifies, CheckpointIntegrityError).
    """
    load_dir = Path(load_dir)
    if iteration is not None and not is_checkpoint_folder(load_dir):
        load_dir = load_dir / iteration_dir_name(iteration)
        if not load_dir.is_dir():
            raise FileNotFoundError(f"no checkpoint for iteration {iteration} at {load_dir}")
    if is_checkpoint_folder(load_dir):
        status = verify_checkpoint(load_dir, extra_check)
        if not status.loadable:
            raise CheckpointIntegrityError(f"checkpoint {load_dir} cannot be trusted: {status.describe()}")
        return _checked(status)
    complete = complete_checkpoints(load_dir)
    if not complete:
        return None
    first = latest_checkpoint(load_dir)
    order = [first] + [complete[i] for i in sorted(complete, reverse=True) if complete[i] != first]
    bad = []
    for path in order:
        status = verify_checkpoint(path, extra_check)
        if status.loadable:
            if bad:
                logger.warning(
                    "CHECKPOINT INTEGRITY: skipping %s; loading the newest good checkpoint %s instead",
                    ", ".join(s.describe() for s in bad),
                    path,
                )
            return _checked(status)
        bad.append(status)
        if not fall_back:
            raise CheckpointIntegrityError(
                f"the newest checkpoint under {load_dir} cannot be trusted: {status.describe()}; "
                "training.checkpoint.strict_integrity is set, so no older one is loaded instead"
            )
    raise CheckpointIntegrityError(
        f"no checkpoint under {load_dir} verifies: " + "; ".join(s.describe() for s in bad)
    )


# -- one writer per save dir; disk space ---------------------------------------------------------------


class SaveDirInUseError(RuntimeError):
    """Another live run holds the save dir's lock."""


class SaveDirLock:
    """An exclusive, non-blocking flock on `<save_dir>/run.lock` for the lifetime of a run.

    The kernel drops the lock when the holder dies, however it dies, so a crashed run never blocks
    the next one. The lock file stays (removing it would race with a new holder); its content names
    the current holder. Local file systems, NFSv4 and Lustre (mounted with `flock`) honour it across
    hosts.
    """

    def __init__(self, save_dir: str | Path):
        self.path = Path(save_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SaveDirInUseError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise SaveDirInUseError(
                f"{self.path.parent} is being written by another run ({holder}); two runs must not share "
                "a save dir. Wait for that run to end, or give this one its own training.checkpoint.save_dir"
            ) from None
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SaveDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CheckpointSpaceError(OSError):
    """Too little free space for a checkpoint; says where, how much is free and how much is needed."""


def _size_in_words(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes a checkpoint folder takes (its files' sizes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_free_space(save_dir: str | Path, margin: float = 1.1) -> None:
    """Raise CheckpointSpaceError when save_dir cannot hold another checkpoint as large as its last
    one (times `margin`); no previous checkpoint, no check."""
    save_dir = Path(save_dir)
    previous = latest_checkpoint(save_dir) if save_dir.is_dir() else None
    if previous is None:
        return
    needed = int(checkpoint_bytes(previous) * margin)
    free = shutil.disk_usage(save_dir).free
    if free < needed and _deletions:  # space that pruning is still giving back
        wait_for_deletions()
        free = shutil.disk_usage(save_dir).free
    if free < needed:
        raise CheckpointSpaceError(
            errno.ENOSPC,
            f"not enough disk space for the next checkpoint in {save_dir}: {_size_in_words(free)} free, "
            f"{_size_in_words(needed)} needed (the last checkpoint, {previous.name}, takes "
            f"{_size_in_words(checkpoint_bytes(previous))}). Free space there or lower "
            f"training.checkpoint.keep_last; {previous.name} is intact and the run resumes from it",
        )


def is_out_of_space(exc: BaseException) -> bool:
    """Whether an exception (or one it wraps) comes from a full disk or quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_write_error(save_dir: str | Path, exc: BaseException) -> BaseException:
    """A CheckpointSpaceError in words for a full disk met while writing, else `exc` unchanged."""
    if not is_out_of_space(exc):
        return exc
    save_dir = Path(save_dir)
    free = shutil.disk_usage(save_dir).free if save_dir.is_dir() else 0
    previous = latest_checkpoint(save_dir) if save_dir.is_dir() else None
    kept = (
        f"the previous checkpoint {previous.name} ({_size_in_words(checkpoint_bytes(previous))}) is intact "
        "and the run resumes from it"
        if previous is not None
        else "no earlier checkpoint exists"
    )
    return CheckpointSpaceError(
        errno.ENOSPC,
        f"the disk holding {save_dir} filled up while a checkpoint was written ({_size_in_words(free)} free "
        f"now; the partial save was removed). Free space there or lower training.checkpoint.keep_last; "
        f"{kept}",
    )


# -- paths a user gives: checked before launch ----------------------------------------------------


def _found_at(path: Path) -> str:
    """A short description of what `path` is, for an error message."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if path.is_file():
        return f"a file of {_size_in_words(path.stat().st_size)}"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
    return f"a folder holding {shown}"


def checkpoint_source_problem(path: str | Path, field: str) -> str | None:
    """Why `path` cannot be resumed from (a save dir with a complete checkpoint, or one checkpoint
    folder), naming `field` and what is there; None when it can."""
    path = Path(path)
    if path.is_dir() and (is_checkpoint_folder(path) or complete_checkpoints(path)):
        return None
    incomplete = checkpoint_folders(path)
    detail = (
        f"only unfinished saves ({', '.join(p.name for p in incomplete.values())}, no {META_FILE})"
        if incomplete
        else _found_at(path)
    )
    return (
        f"{field}={path} is not a checkpoint: found {detail}. Give the save dir of a run (the folder "
        "holding `latest` and iter_XXXXXXX folders) or one iter_XXXXXXX folder"
    )


def weights_source_problem(path: str | Path, field: str) -> str | None:
    """Why `path` cannot give model weights (a flat .safetensors export or a training checkpoint),
    naming `field` and what is there; None when it can."""
    path = Path(path)
    if path.is_dir():
        problem = checkpoint_source_problem(path, field)
        return problem and problem.replace("is not a checkpoint", "is neither weights nor a checkpoint")
    flat = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if flat.is_file():
        return None
    return (
        f"{field}={path} is neither weights nor a checkpoint: found {_found_at(path)}. Give a flat export "
        "(final_ema.safetensors / final_model.safetensors) or a training checkpoint folder"
    )


def save_dir_problem(path: str | Path, field: str) -> str | None:
    """Why `path` cannot be a save dir (a file, or one checkpoint folder); None when it can."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{field}={path} is a file; give a folder for the checkpoints"
    if is_checkpoint_folder(path):
        return (
            f"{field}={path} is one checkpoint, not a save dir; give the folder that holds the iter_XXXXXXX "
            "folders (its parent)"
        )
    return None
