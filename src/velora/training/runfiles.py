"""Every file ``velora train`` writes into a run folder, written one safe way.

* **No symlinks.** A symlink where a run file or folder should be (``log.csv``, ``tokenizer.json``,
  ``checkpoints/``, ``checkpoints/latest``, ``tensorboard/`` ...) is refused: writing through it would
  overwrite a file outside the run folder.
* **Atomic.** A file is written to a fresh temporary in the same folder (``O_CREAT | O_EXCL | O_NOFOLLOW``),
  fsynced and renamed over the target, so a reader sees the old file or the new one, never half of one.
  ``log.csv``, appended every step, is opened with ``O_NOFOLLOW``.
* **Failures are one line.** Disk full, a read-only folder: ``RunFolderError`` (an ``OSError`` and a
  ``ValueError``, so the CLI prints it as one line) names the file and the fix; the temporary is removed.
  Temporaries left by a killed process are removed by ``remove_stale_temporaries`` at the next start.
* **The ``latest`` pointer** must name a ``step-NNNNNNN`` folder inside ``checkpoints/`` (checked on read).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

STEP_FOLDER = re.compile(r"step-\d{7}")
# temporaries this module and save_checkpoint create: ".<name>.tmp<pid>" and "checkpoints/.tmp-step-<step>-<pid>"
TEMPORARY = re.compile(r"\.(?:.+\.tmp|tmp-step-\d{7}-)(\d+)")


def fsync_files(folder: Path) -> None:
    """fsync every file under ``folder`` (a step folder: model and state, or DCP's one file per rank + metadata)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def temporary_step_folder(root: Path, step: int, pid: int) -> Path:
    """Where step ``step`` is written before it is renamed into place, named after the writing process ``pid``
    (``remove_stale_temporaries`` removes it once that process is gone)."""
    return root / f".tmp-step-{step:07d}-{pid}"


class RunFolderError(OSError, ValueError):
    """A run-folder file cannot be written (symlink, disk full, read-only); the message is one line."""


def why(err: OSError) -> str:
    """The OS reason in a few words, plus the usual fix."""
    if err.errno == errno.ENOSPC:
        return "no space left on the device; free space (or choose another --out), then --resume"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; make it writable (or choose another --out), then --resume"
    return f"{err.strerror or err}; fix the folder (or choose another --out), then --resume"


def refuse_symlink(path: Path) -> None:
    """Raise when ``path`` is a symlink (a dangling one included)."""
    if os.path.islink(path):
        raise RunFolderError(f"{path} is a symlink (to {os.readlink(path)}); velora writes run files only as "
                             "plain files inside the run folder: remove the link or choose another --out")


def ensure_folder(path: Path) -> Path:
    """Create ``path`` (parents included) unless it exists; refuse a symlink in its place."""
    refuse_symlink(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create {path}: {why(err)}") from None
    return path


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a no-follow temporary renamed into place; refuse a symlink at ``path``."""
    refuse_symlink(path)
    refuse_symlink(path.parent)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = _temporary_name(path)
    remove_quietly(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        remove_quietly(tmp)
        raise RunFolderError(f"cannot write {path}: {why(err)}") from None


def open_for_append(path: Path):
    """A text handle appending to ``path`` that never follows a symlink (refused with one line)."""
    refuse_symlink(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_symlink(path)  # appeared since the check
        raise RunFolderError(f"cannot open {path}: {why(err)}") from None
    return os.fdopen(fd, "a", newline="")


def remove_quietly(path: Path) -> None:
    """Remove a file or folder (not what a symlink points to); missing is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call that failed: no longer in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove temporaries that a killed or failed run left in ``out_dir`` and ``out_dir/checkpoints``
    (those of a process still alive are kept). Returns what was removed."""
    removed = []
    for folder in (out_dir, out_dir / "checkpoints"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in folder.iterdir():
            match = TEMPORARY.fullmatch(entry.name)
            if match and not _process_alive(int(match.group(1))):
                remove_quietly(entry)
                removed.append(entry)
    return removed


def read_latest_pointer(root: Path) -> Path | None:
    """The step folder ``root/latest`` names, or None without a pointer. Refuses a symlinked pointer and any
    name that is not a ``step-NNNNNNN`` folder directly inside ``root``."""
    pointer = root / "latest"
    refuse_symlink(root)
    refuse_symlink(pointer)
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not STEP_FOLDER.fullmatch(name):
        raise ValueError(f"{pointer} names {name[:80]!r}, not a step-NNNNNNN folder of {root}; delete the pointer "
                         "and point it at an existing step folder, or start over")
    path = root / name
    refuse_symlink(path)
    return path
