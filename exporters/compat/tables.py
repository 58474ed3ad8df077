"""The facts the compatibility checks rest on: what each target's parser takes, as its public sources say.

Where they come from (read in the public sources; nothing below is guessed beyond what the
comments say):

* ``tensorrt-10``: onnx/onnx-tensorrt ``docs/operators.md`` as of TensorRT 10.15
  ("supports operators in the inclusive range of opset 9 to opset 24"), with the
  operators added after 10.0 dated from ``docs/Changelog.md`` (10.1 DeformConv,
  10.4 windows, 10.5 STFT, 10.12 Einsum ellipsis/diagonal, 10.14 Attention,
  10.15 RMSNormalization/RotaryEmbedding/TensorScatter): those give a warning
  naming the first 10.x release that parses them.
* ``tensorrt-8.6``: the release/8.6 copy of ``docs/operators.md`` was not available;
  the table is the TensorRT 8.5 GA one (onnx/onnx-tensorrt@6d0ab7be, "up to Opset
  17", INT64 cast down to INT32) plus the "TensorRT 8.6 EA Release" changelog entry:
  GroupNormalization, LayerNormalization and IsInf added, INT32 for ArgMin/ArgMax/TopK,
  TopK with a dynamic K. Local functions only from 9.0 ("9.0 EA Release"). One
  deviation: ConstantOfShape takes any value type, as the 8.x importer
  (``builtin_op_importers.cpp``) does, where the table says FP32 only.
* TopK's K limit: "`K` input must be less than 3840" (10.x table); the TensorRT
  operator reference gives ``k <= 3840`` for ITopKLayer.
* ``dla``: NVIDIA/Deep-Learning-Accelerator-SW ``operators/README.md`` (column "Orin
  DLA support through TensorRT"), and the TensorRT guide "DLA Supported Layers and
  Restrictions" ("DLA does not support dynamic dimensions") and "GPU Fallback Mode".
  DLA engines are built by TensorRT, so the ``tensorrt-10`` checks apply too.
* ``onnxruntime``: an ``InferenceSession`` on the CPU provider is the authority; only the
  domains built into it are listed here.

The per-operator restrictions that need code (K limits, constant axes, Resize modes) are the
rules of each TensorRT target's module; their limits and allowed values are here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ats_deploy.sampler_op import DOMAIN, OP_TYPE


@dataclass(frozen=True)
class ParserTable:
    """One TensorRT release's ONNX parser, as its operator table and changelog give it."""

    version: str
    types: dict[str, frozenset[str]]  # op -> the "Supported Types" of its row
    tensor_types: frozenset[str]  # every type a TensorRT tensor may have
    opsets: tuple[int, int]
    int64_cast_down: bool  # TensorRT < 9: INT64 becomes INT32 (clamped)
    local_functions: bool
    since: dict[str, str]  # op -> first release of the series whose parser has it (absent: all of them)


def _types(*names: str) -> frozenset[str]:
    return frozenset(names)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _by_op(groups: dict[frozenset[str], str]) -> dict[str, frozenset[str]]:
    """``{types: "Op Op ..."}`` -> ``{op: types}``: one line per "Supported Types" cell."""
    return {op: types for types, names in groups.items() for op in names.split()}


REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare"
)

# TensorRT 8.6: the 8.5 GA table plus the 8.6 EA changelog. Ops absent (Unique, Hardmax,
# sequences, Optional, CastLike, BitShift...) are "N" or unlisted there. The types of the
# three ops added in 8.6 are not in the changelog: FP32/FP16 as for every 8.x float op.
# ConstantOfShape: the table says FP32 only, but the 8.x importer (builtin_op_importers.cpp)
# converts a `value` of any type, so it shares Constant's types here.
TENSORRT_8_6 = ParserTable(
    version="8.6",
    types=_by_op(
        {
            _types("FP32", "FP16"): (
                "Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Cos Cosh CumSum Dropout "
                "Einsum Erf Exp Floor GridSample GRU ImageScaler InstanceNormalization Log LogSoftmax LRN "
                "LSTM LpNormalization MatMul MeanVarianceNormalization NonMaxSuppression NonZero Pow "
                "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal "
                f"{REDUCE_OPS} Resize ReverseSequence RNN RoiAlign Scan Sin Sinh Softmax Sqrt Tan Upsample "
                "GroupNormalization IsInf LayerNormalization"
            ),
            _types("FP32", "FP16", "INT8"): (
                "Clip Conv ConvTranspose Elu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool HardSigmoid "
                "HardSwish LeakyRelu LpPool MaxPool ParametricSoftplus PRelu Relu Round ScaledTanh Selu "
                "Sigmoid Softplus Softsign Tanh ThresholdedRelu"
            ),
            _types("FP32", "FP16", "INT32"): (
                "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual "
                "Max Mean Min Mod Mul Neg Range Shrink SpaceToDepth Sub Sum TopK"
            ),
            _types("FP32", "FP16", "INT8", "INT32"): "AveragePool Pad Scatter ScatterElements ScatterND Sign",
            _types("FP32", "FP16", "INT32", "BOOL"): "Expand EyeLike Flatten If Loop OneHot Split Tile Where",
            _types("FP32", "FP16", "INT32", "INT8", "BOOL"): (
                "Cast Concat Constant ConstantOfShape Gather GatherElements GatherND Identity Reshape Shape Size Slice "
                "Squeeze Transpose Trilu Unsqueeze"
            ),
            _types("BOOL"): "And Not Or Xor",
            _types("INT8"): "DequantizeLinear",
        }
    ),
    tensor_types=_types("FP32", "FP16", "INT8", "INT32", "INT64", "UINT8", "BOOL"),
    opsets=(1, 17),
    int64_cast_down=True,
    local_functions=False,
    since={},
)

_F10 = ("FP32", "FP16", "BF16")
_I10 = ("INT32", "INT64")
TENSORRT_10 = ParserTable(
    version="10",
    types=_by_op(
        {
            _types(*_F10): (
                "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
                "ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
                "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler "
                "InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM "
                "LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
                "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal "
                "Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
                "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"
            ),
            _types("FP32", "FP16"): (
                "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign"
            ),
            _types(*_F10, *_I10): (
                "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual "
                f"Max Min Mod Mul Neg Pad Pow Range {REDUCE_OPS} Relu Scatter ScatterElements ScatterND "
                "Shrink Sign SpaceToDepth Sub Sum TopK"
            ),
            _types(*_F10, *_I10, "BOOL"): (
                "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot "
                "Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"
            ),
            _types(*_F10, *_I10, "UINT8", "BOOL"): "Cast CastLike",
            _types(*_F10, *_I10, "FP8", "FP4", "INT4", "BOOL"): "Constant ConstantOfShape",
            _types("BOOL"): "And Not Or Xor",
            _types("INT8", "FP8", "FP4", "INT4"): "DequantizeLinear",
            _types(*_F10, "INT8", "FP8"): "Attention",
            _types(*_F10, "INT8", *_I10): "Gelu",
            _types(*_F10, "FP8", *_I10): "Mean",
            _types(*_F10, "INT32"): "TensorScatter",
            _types("FP32"): "STFT",
        }
    ),
    tensor_types=_types(*_F10, *_I10, "FP8", "FP4", "INT4", "INT8", "UINT8", "BOOL"),
    opsets=(9, 24),
    int64_cast_down=False,
    local_functions=True,
    since={
        "DeformConv": "10.1",
        "BlackmanWindow": "10.4",
        "HammingWindow": "10.4",
        "HannWindow": "10.4",
        "STFT": "10.5",
        "Attention": "10.14",
        "RMSNormalization": "10.15",
        "RotaryEmbedding": "10.15",
        "TensorScatter": "10.15",
    },
)

# Which tensors carry an op's type T (the "Supported Types" column); default: input 0.
TYPED_SLOTS: dict[str, tuple[tuple[str, int], ...]] = {
    "Cast": (("in", 0), ("out", 0)),
    "CastLike": (("in", 0), ("out", 0)),
    "Where": (("in", 1),),
    "Constant": (("out", 0),),
    "ConstantOfShape": (("out", 0),),
    "RandomNormal": (("out", 0),),
    "RandomUniform": (("out", 0),),
}

TOPK_MAX_K = 3840  # "`K` input must be less than 3840" (onnx-tensorrt 10.x table)
RESIZE_ALLOWED = (
    (
        "coordinate_transformation_mode",
        "half_pixel",
        frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}),
    ),
    ("mode", "nearest", frozenset({"nearest", "linear"})),
)
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})

# This project's own op (``--ats-op custom``): a TensorRT Python plugin (ats_deploy/backends/tensorrt/plugin.py;
# ``tensorrt.plugin`` exists from TensorRT 10.6) and an onnxruntime-extensions kernel.
PROJECT_OPS = frozenset({(DOMAIN, OP_TYPE)})
PLUGIN_TRT_MAJOR = 10

# --------------------------------------------------------------------------- DLA

# Output shape depends on tensor values, whatever the input shapes.
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})
# Inputs that set the output shape: run-time values there make the shape dynamic.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "TopK": (1,),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "OneHot": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
}
# "Orin DLA support through TensorRT" = Native (Constant, Shape, ConstantOfShape are folded
# at build time); "Reconstruction" ops can be rewritten into native ones.
DLA_NATIVE = _names(
    "Abs Add AveragePool BatchNormalization Clip Concat Constant ConstantOfShape Conv ConvTranspose Equal "
    "Gemm LeakyRelu LRN MatMul Max MaxPool Mul PRelu Relu Reshape Resize Shape Sigmoid Slice Softmax Split "
    "Sub Sum Tanh Transpose Upsample"
)
DLA_RECONSTRUCTION = _names(
    "And CumSum DepthToSpace DequantizeLinear Gather GatherElements GatherND GRU Identity LSTM Neg Not Or "
    "QuantizeLinear ReduceMax ReduceSum RNN Scatter ScatterElements SpaceToDepth Where Xor"
)
DLA_CONSTANT_WEIGHTS = frozenset({"MatMul", "Gemm"})  # "The second input must be a constant"
# TensorRT's builder log: "DLA supports only 16 subgraphs per DLA core. Switching to GPU for layer ...".
DLA_MAX_SUBGRAPHS = 16

# --------------------------------------------------------------------------- onnxruntime

ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
