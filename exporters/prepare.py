"""The file a backend runs for an exported file: made here, since writing graphs and engines is exporter work.

A backend opens what it is given (:meth:`ats_deploy.backends.Backend.open`). Before that:

* a converted precision (fp16) that the backend does not run from the float32 file by a setting of
  its own (:attr:`~ats_deploy.backends.Backend.native`) runs the converted copy of the ONNX file
  (:func:`runnable`; the onnxruntime CUDA provider);
* a backend that runs engines runs the engine ``ats-deploy build`` wrote; bench builds only its
  own dense baseline, like the ATS engine it measures (:func:`baseline`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ats_deploy import precision as precisions
from ats_deploy.atomic import atomic_output

from .precisions import convert

if TYPE_CHECKING:
    from rich.console import Console

    from ats_deploy.backends import Backend, Runner, RunOptions
    from ats_deploy.profiles import Profile


def runnable(backend: Backend, path: Path, precision: str, workdir: Path) -> Path:
    """The file ``backend`` runs for the exported file ``path`` in ``precision``.

    An ONNX file in a converted precision the backend does not run natively becomes its converted copy
    ``<stem>.<precision>.onnx`` in ``workdir``, written atomically; anything else runs as it is.
    """
    entry = precisions.get(precision)
    if entry.stage != "build" or precision in backend.native or backend.engines:  # an engine holds its precision
        return path
    import onnx

    converted = workdir / f"{path.stem}.{entry.name}.onnx"
    with atomic_output(converted) as temporary:
        onnx.save(convert(entry, onnx.load(str(path))), str(temporary))
    return converted


def open_runner(backend: Backend, path: Path, options: RunOptions, workdir: Path) -> Runner:
    """``backend``'s runner of the exported file ``path`` at ``options``' precision (:func:`runnable`)."""
    return backend.open(runnable(backend, path, options.precision, workdir), options)


def baseline(backend: Backend, onnx_path: Path, profile: Profile, like: Path, workdir: Path, status: Console) -> Path:
    """The file ``backend`` runs for an ONNX file bench exported itself (the dense baseline), made like ``like``.

    A backend that runs engines gets an engine built in ``workdir`` for ``profile``, reusing the kernel timings
    of the engine ``like``; any other backend the ONNX file (:func:`open_runner` converts it where needed).
    """
    if not backend.engines:
        return onnx_path
    from .tensorrt.build import build_engine
    from .tensorrt.plan import spec_from

    cache = like.with_name(f"{profile.name}.timing.cache")  # the engine ``like``'s kernel timings
    spec = replace(spec_from(onnx_path, profile, output=workdir, allow_failed=True), timing_cache=cache)
    return build_engine(spec, status)
