"""``ats-deploy triton``: the model repository, its front model under ``--slo-ms`` and its KServe objects.

Every KServe object is built and checked before the repository is written, so a bad ``--kserve`` option leaves
nothing behind; the CLI only parses, calls :func:`write` and prints what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import kserve
from .adaptive import Front, SloOptions, write_repository_with_front
from .repository import Repository
from .repository import write as write_repository

if TYPE_CHECKING:
    from rich.console import Console

    from ..profiles import Profile


@dataclass(frozen=True)
class Written:
    """What :func:`write` wrote: the model's folder, the front model (``--slo-ms``) and the KServe folder."""

    repository: Repository
    front: Front | None
    kserve: kserve.Deployment | None
    kserve_folder: Path | None


def write(
    model: Path, profile: Profile, output: Path, name: str | None, slo: SloOptions | None,
    kserve_options: kserve.Options | None, console: Console, allow_failed: bool = False,
) -> Written:
    """Write ``output/<name>/`` for ``model`` served with ``profile``: behind a front model that holds ``slo``'s
    latency target when given (README: "Load-adaptive budgets"), and ``output-kserve/`` when ``kserve_options``
    are given (README: "Deploying on Kubernetes"); ``console`` shows a spinner while the model is copied.
    """
    deployment = None
    if kserve_options is not None:  # every object built and checked before anything is written
        deployment = kserve.plan(model, profile, output, kserve_options, front=slo is not None,
                                 allow_failed=allow_failed)
    front = None
    if slo is not None:
        written, front = write_repository_with_front(model, profile, output, name, slo, allow_failed)
    else:
        from rich.markup import escape

        with console.status(f"writing the model repository {escape(str(output))}"):
            written = write_repository(model, profile, output, name, allow_failed)
    folder = kserve.write(deployment) if deployment is not None else None
    return Written(written, front, deployment, folder)
