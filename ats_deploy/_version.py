"""The installed ats-deploy's version, in a module of its own: core modules that record it (checkpoints) read it
here, so that they do not import the package's ``__init__``, which imports them for :func:`ats_deploy.load_model`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ats-deploy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
