"""Target ``tensorrt-10``: the TensorRT 10 ONNX parser (table: :data:`.tables.TENSORRT_10`) and, for an
INT8 export, the Q/DQ placement its explicit quantization takes."""

from __future__ import annotations

from pathlib import Path

import onnx

from .graph import Facts
from .report import DlaShare, Finding
from .tables import REDUCE_OPS, TENSORRT_10
from .tensorrt import (
    Parser,
    check_parser,
    einsum_plain,
    only_first_output,
    resize_10,
    resize_modes,
    topk_k,
    topk_sorted,
    weights_input,
)

PARSER = Parser(
    TENSORRT_10,
    rules={
        "TopK": (topk_k, topk_sorted),
        "CumSum": (weights_input(1, "axis", foldable=True),),
        "Squeeze": (weights_input(1, "axes", foldable=True),),
        "Unsqueeze": (weights_input(1, "axes", foldable=True),),
        **{op: (weights_input(1, "axes"),) for op in REDUCE_OPS.split()},
        "Resize": (resize_modes, resize_10),
        "Einsum": (einsum_plain("warning", "parsed only from TensorRT 10.12 on"),),
        "MaxPool": (only_first_output("the `Indices` output"),),
        "LayerNormalization": (only_first_output("`Mean` and `InvStdDev`"),),
    },
)


def _qdq_findings(model: onnx.ModelProto) -> list[Finding]:
    """Q/DQ placement of an INT8 export: what TensorRT 10's explicit quantization takes, the sampling path float32."""
    from ..precisions.int8 import placement_problems

    return [Finding("error", node, op, why) for node, op, why in placement_problems(model)]


def check(model: onnx.ModelProto, facts: Facts, source: Path | None) -> tuple[list[Finding], DlaShare | None]:
    """What the 10.x parser rejects or warns about, then the Q/DQ placement."""
    return check_parser(facts, PARSER) + _qdq_findings(model), None
