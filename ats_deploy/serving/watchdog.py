"""What a ``serve`` run leaves must go with it, however it ends: Triton's process groups, shared memory, temp folder.

``serve`` starts ``python -m ats_deploy.serving.watchdog FOLDER SHM_PREFIX`` beside Triton, holding the
write end of its stdin, and writes the process group of each Triton it starts there, one per line.
End of input means ``serve`` is gone (a SIGKILL included: the kernel closes its pipe), and the watchdog
then does what ``serve`` would have done at its stop (:func:`cleanup`). ``serve`` calls :func:`cleanup`
itself at a normal stop, so the watchdog then finds nothing left.

:func:`sweep` is the last resort, run at every start: the leftovers of a run whose ``serve`` *and*
watchdog were killed (both named after ``serve``'s PID, removed only when that process is gone, since other
servers may be running on this machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

PREFIX = "ats-deploy-serve-"  # temp folders and shared-memory segments: PREFIX<serve's PID>-...
SHM = Path("/dev/shm")  # where the Python backend's segments (POSIX shared memory) live on Linux
GONE_S = 10.0  # how long a killed group may take to disappear (the kernel reaps asynchronously)


def kill_group(group: int) -> None:
    """SIGKILL every process of ``group`` (Triton and its Python-backend stubs) and wait until they are gone."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GONE_S
    while time.monotonic() < deadline and group_alive(group):
        time.sleep(0.05)


def group_alive(group: int) -> bool:
    """Whether a process of ``group`` is still running (zombies, already dead, do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def cleanup(groups: list[int], folder: Path | None, shm_prefix: str) -> None:
    """Kill ``groups``, then remove the shared-memory segments named ``shm_prefix*`` and ``folder``."""
    for group in groups:
        kill_group(group)
    remove_segments(shm_prefix)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def remove_segments(shm_prefix: str) -> None:
    """Remove the run's shared-memory segments (the Python backend's, named after the run's prefix)."""
    if not shm_prefix.startswith(PREFIX):  # never a pattern that could match another program's segments
        raise ValueError(f"not a serve run's prefix: {shm_prefix!r}")
    for segment in SHM.glob(f"{shm_prefix}*"):
        segment.unlink(missing_ok=True)


def sweep(temp: Path | None = None, shm: Path = SHM) -> list[Path]:
    """Remove the temp folders and segments of ``serve`` runs whose process is gone; what was removed."""
    removed = []
    for path in [*Path(temp or tempfile.gettempdir()).glob(f"{PREFIX}*"), *shm.glob(f"{PREFIX}*")]:
        owner = _owner(path.name)
        try:
            mine = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owner is None or not mine or _running(owner):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _owner(name: str) -> int | None:
    pid = name[len(PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def main(argv: list[str]) -> None:
    folder, shm_prefix = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches serve, which stops Triton itself
    groups = [int(line) for line in sys.stdin if line.strip()]  # until serve closes the pipe or dies
    cleanup(groups, Path(folder), shm_prefix)


if __name__ == "__main__":
    main(sys.argv[1:])
