"""Target ``tensorrt-8.6``: the TensorRT 8.6 ONNX parser (table: :data:`.tables.TENSORRT_8_6`)."""

from __future__ import annotations

from pathlib import Path

import onnx

from .graph import Facts
from .report import DlaShare, Finding
from .tables import TENSORRT_8_6
from .tensorrt import Parser, check_parser, einsum_plain, only_first_output, resize_modes, topk_k, weights_input

PARSER = Parser(
    TENSORRT_8_6,
    rules={
        "TopK": (topk_k,),
        "CumSum": (weights_input(1, "axis"),),
        "Slice": (weights_input(3, "axes"),),
        "Squeeze": (weights_input(1, "axes"),),
        "Unsqueeze": (weights_input(1, "axes"),),
        "Resize": (resize_modes,),
        "Einsum": (einsum_plain("error", "not supported by TensorRT 8.6; write it out with MatMul"),),
        "MaxPool": (only_first_output("the `Indices` output"),),
    },
)


def check(model: onnx.ModelProto, facts: Facts, source: Path | None) -> tuple[list[Finding], DlaShare | None]:
    """What the 8.6 parser rejects or warns about."""
    return check_parser(facts, PARSER), None
