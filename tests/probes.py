"""What this machine can run, read from the backend registry: the one TensorRT probe the tests share.

The registry already knows why TensorRT cannot run here (not installed, or no CUDA device); the tests ask it
rather than importing ``tensorrt`` themselves, so a test skips for the same reason the CLI refuses.
"""

from __future__ import annotations

import pytest

from ats_deploy import backends
from ats_deploy.backends.base import installed_version

TENSORRT_UNAVAILABLE = backends.get("tensorrt").unavailable()  # None where an engine can be built and run
needs_tensorrt = pytest.mark.skipif(
    TENSORRT_UNAVAILABLE is not None, reason=f"needs TensorRT and an NVIDIA GPU ({TENSORRT_UNAVAILABLE})"
)
# The no-TensorRT messages only show where the package is absent (a GPU alone does not matter).
without_tensorrt = pytest.mark.skipif(
    installed_version("tensorrt") is not None,
    reason="checks the message of a machine without TensorRT (installed here)",
)
