"""Crash-safe files in the state directory (RUNTIME.md, State directory).

The state directory is created with mode 0700 and every file in it with 0600.
Writes are atomic: the bytes go to a temporary file in the same directory, which
is flushed to disk (fsync), renamed over the target, and the directory itself
is fsynced so that the rename survives a power cut. A reader therefore sees the
old content or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from appliance.errors import StateError

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it mode 0700; return it."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and does not touch an existing directory.
        os.chmod(path, DIR_MODE)
    except OSError as exc:
        raise StateError(f"cannot create the state directory {path}: {exc.strerror or exc}") from exc
    return path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (a rename) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically (write, fsync, rename), file mode ``mode``.

    The parent directory must exist; it is made 0700 if it is not.
    """
    parent = path.parent
    ensure_private_dir(parent)
    tmp = parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never follow or reuse something another process put there.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(parent)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error is the one worth reporting
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as pretty JSON atomically (0600)."""
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json_file(path: Path) -> Any | None:
    """The JSON content of ``path``, or None when the file does not exist.

    Raises :class:`StateError` when the file exists but cannot be read or parsed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); it may have been edited by hand") from exc
