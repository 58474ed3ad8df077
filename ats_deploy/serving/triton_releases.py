"""Which NGC Triton container loads a TensorRT engine: the release that ships the TensorRT that built it.

A serialized engine loads only in the TensorRT version that built it (TensorRT refuses the plan:
"The engine plan file is not compatible with this version of TensorRT"), so an engine's server is
pinned to the container release whose TensorRT matches ``tensorrt_version`` in ``<engine>.json``.

The table maps TensorRT versions to ``tritonserver:<yy.mm>-py3`` releases as NVIDIA's Deep Learning
Frameworks Support Matrix lists them (https://docs.nvidia.com/deeplearning/frameworks/support-matrix/, the
TensorRT row; the first release shipping each version). Cross-checked against NVIDIA's Triton compatibility
table (github.com/triton-inference-server/server, docs/introduction/compatibility.md), whose
``-trtllm-python-py3`` containers take the stack of the same or an earlier month: every version but 10.2.0
and 10.5.0 appears there; for 10.13.3 and 10.14.1, the CUDA of those rows (13.0.2.006, 13.1.0.036) is the one
the 25.10 and 25.12 release notes give. Versions are matched on major.minor.patch (one GA build each in
these containers). Later releases may ship the same TensorRT; a version the table does not hold is refused
rather than guessed.
"""

from __future__ import annotations

from ..errors import UserError

IMAGE = "nvcr.io/nvidia/tritonserver:{release}-py3"
SUPPORT_MATRIX = "https://docs.nvidia.com/deeplearning/frameworks/support-matrix/"
# TensorRT major.minor.patch -> the first tritonserver:<yy.mm>-py3 release shipping it.
RELEASES = {
    "10.0.1": "24.05",
    "10.1.0": "24.06",
    "10.2.0": "24.07",
    "10.3.0": "24.08",
    "10.4.0": "24.09",
    "10.5.0": "24.10",
    "10.6.0": "24.11",
    "10.7.0": "24.12",
    "10.8.0": "25.01",
    "10.9.0": "25.03",
    "10.10.0": "25.05",
    "10.11.0": "25.06",
    "10.13.3": "25.10",
    "10.14.1": "25.12",
}


def known_release(tensorrt_version: str | None) -> str | None:
    """The release shipping ``tensorrt_version`` (compared on major.minor.patch); None where the table has none."""
    return RELEASES.get(".".join(tensorrt_version.split(".")[:3])) if tensorrt_version else None


def release_for(tensorrt_version: str | None, engine: str) -> str:
    """The Triton release (``yy.mm``) whose container loads an engine built with ``tensorrt_version``."""
    known = ", ".join(f"{version} ({release})" for version, release in RELEASES.items())
    rebuild = (f"Rebuild the engine with a TensorRT the table knows ({known}), for example inside the container "
               f"you will serve it with, or serve the ONNX file instead; {SUPPORT_MATRIX} lists each release's "
               "TensorRT.")
    if not tensorrt_version:
        raise UserError(f"{engine}.json does not record which TensorRT built the engine, so no Triton release can "
                        "be chosen to load it.", hint=rebuild)
    release = known_release(tensorrt_version)
    if release is None:
        raise UserError(f"engine {engine} was built with TensorRT {tensorrt_version}, which no Triton release in "
                        "ats-deploy's table ships, and an engine loads only in the TensorRT that built it.",
                        hint=rebuild)
    return release
