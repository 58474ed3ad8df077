"""Atomic file output: a reader, or a crash, never sees half a file.

Everything ats-deploy writes (ONNX files, checkpoints, engines, profiles,
results, plots) goes to a temporary file beside its target and is moved into
place only when complete: ``os.replace`` within one directory is atomic.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _new_file_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it only if the block succeeds; removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(temporary, _new_file_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(Path(path)) as temporary:
        temporary.write_bytes(data)
