"""PNG plots, written atomically: how bench, tune and loadtest save the matplotlib figures they draw.

Figures are drawn on matplotlib's ``Figure`` directly (the Agg renderer, no pyplot state, no display needed).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as a PNG (120 dpi, trimmed to what is drawn); a reader never sees half of it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    return path
