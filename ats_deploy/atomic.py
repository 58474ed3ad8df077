"""Atomic file output: a reader, or a crash, never sees half a file.

Everything ats-deploy writes (ONNX files, checkpoints, engines, profiles,
results, plots) goes to a temporary file beside its target and is moved into
place only when complete: ``os.replace`` within one directory is atomic. A
target that cannot be written (a full disk, a read-only or virtual file system
such as ``/proc``) is one :class:`~ats_deploy.errors.UserError` here, for every
writer, and leaves nothing behind. Where a command's output goes is settled here
too: the file ``-o`` means (:func:`output_path`), a results folder (:func:`output_folder`), checked writable before
any work (:func:`check_folder`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

# Errors of writing itself, whatever the block writes with; other errors of the block are its own and pass through.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _new_file_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def output_path(output: str | os.PathLike[str] | None, default: str | os.PathLike[str] | None) -> Path:
    """The file ``-o output`` means: ``default`` when not given; a folder (an existing one, or any path written with
    a trailing slash) means "put it in there", under ``default``'s name; a command without a default name refuses it.

    ``pathlib`` drops a trailing slash, so ``output`` is the text as typed: ``-o models/`` must not become a file
    called ``models``.
    """
    if output is None:
        if default is None:
            raise ValueError("output_path needs an output or a default")
        return Path(default)
    text = os.fspath(output)
    if not (text.endswith(("/", os.sep)) or Path(text).is_dir()):
        return Path(text)
    if default is None:
        raise UserError(f"output {text} is a folder; give a file name such as {Path(text) / 'model.pth'}.")
    return Path(text) / Path(default).name


def check_folder(folder: Path, option: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written in, as ``check_output_path`` does for files.

    The folder need not exist yet: its nearest existing ancestor must then be a folder we may write in.
    """
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is a file, not a folder; choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing}: permission denied; choose another {option}.")


def output_folder(out: Path | None, profile: str, option: str = "--out") -> Path:
    """``out`` (given as ``option``), or a new ``./results/<timestamp>-<profile>/``."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"{option} {out} is a file; give a folder for results.json, results.csv and the plots.")
        return out
    base = Path("results") / f"{time.strftime('%Y%m%d-%H%M%S')}-{profile}"
    folder, count = base, 1
    while folder.exists():
        count += 1
        folder = base.with_name(f"{base.name}-{count}")
    return folder


def cannot_write(path: Path, error: OSError) -> UserError:
    """The one message for an output that cannot be written: why, and what to do about it."""
    reason = error.strerror or str(error)
    where = path.parent
    if error.filename and Path(os.fsdecode(error.filename)).parent != path.parent:  # e.g. a scratch file in /tmp
        where = Path(os.fsdecode(error.filename)).parent
        reason += f" (at {os.fsdecode(error.filename)})"
    if error.errno in _NO_ROOM:
        hint = f"Free space on the disk that holds {where}, or write the output elsewhere."
    else:
        hint = "Choose a writable location for the output (a folder on a normal, writable disk)."
    return UserError(f"cannot write {path}: {reason}; nothing was written.", hint=hint)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it only if the block succeeds; removed otherwise.

    Failing to create the file, to fill it (no space) or to move it into place raises :func:`cannot_write`'s error.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
    except OSError as e:
        raise cannot_write(path, e) from None
    temporary = Path(name)
    try:
        try:
            yield temporary
        except OSError as e:
            if e.errno not in _WRITE_ERRORS:
                raise
            raise cannot_write(path, e) from None
        try:
            _commit(temporary, path)
        except OSError as e:
            raise cannot_write(path, e) from None
    finally:
        temporary.unlink(missing_ok=True)


def _commit(temporary: Path, path: Path) -> None:
    """Flush ``temporary`` to disk (a full disk can show only here), give it a plain file's mode, rename it."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.chmod(temporary, _new_file_mode())
    os.replace(temporary, path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(Path(path)) as temporary:
        temporary.write_bytes(data)


def write_folder(folder: Path, files: dict[str, str], copies: dict[str, Path] | None = None) -> None:
    """Write the text ``files`` and copies of the ``copies`` (both by relative path) into the new folder ``folder``,
    which appears whole or not at all.

    They are written into a staging folder beside ``folder`` (``.NAME.*.tmp``, removed on any failure, Ctrl-C
    included) that is then renamed; an existing ``folder`` is refused (FileExistsError), never merged into.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name, text in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        for name, source in (copies or {}).items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
        staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; what is in it has the usual modes
        if folder.exists():
            raise FileExistsError(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
