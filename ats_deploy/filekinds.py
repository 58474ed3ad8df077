"""What a model file is, from its first bytes: a checkpoint, an exported ONNX model or a TensorRT engine.

Checkpoints and exported models are read by different commands; a file given to the wrong one
is named for what it is, with the commands and calls that read it, instead of being called corrupt.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

CHECKPOINT = "a PyTorch checkpoint"
ONNX = "an ONNX model"
ENGINE = "a TensorRT engine"

# What reads each kind (the CLI and the Python API), said to a user who gave the file to something else.
READERS = {
    CHECKPOINT: "`ats-deploy inspect`, `convert`, `export`, `predict` and `visualize` read checkpoints, and "
    "`ats_deploy.load_model(...)` in Python (`runtime.ReferenceModel(load_model(...))` runs one behind the "
    "runtime's calls); `ats-deploy export CHECKPOINT --dynamic` writes the ONNX file that the other commands and "
    "`ats_deploy.runtime.open` read.",
    ONNX: "An exported model is read by `ats-deploy predict`, `validate`, `check`, `bench`, `build`, `triton` and "
    "`serve`, and by `ats_deploy.runtime.open(...)` in Python; `inspect`, `convert` and `visualize` read the "
    "checkpoint it was exported from.",
    ENGINE: "An engine is read by `ats-deploy predict`, `bench`, `triton` and `serve`, and by "
    "`ats_deploy.runtime.open(...)` in Python (TensorRT needed); `inspect`, `convert` and `visualize` read the "
    "checkpoint it was built from.",
}

ENGINE_SUFFIXES = (".plan", ".engine")  # TensorRT engines carry no header ats-deploy can check
_ZIP = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE = b"\x80"  # a legacy torch.save file starts with a pickle protocol opcode
_ONNX_IR_VERSION = b"\x08"  # an ONNX ModelProto starts with field 1, ir_version (a varint)


def kind_of(path: Path) -> str | None:
    """:data:`CHECKPOINT`, :data:`ONNX` or :data:`ENGINE` by content (engines: by suffix); ``None`` when unclear."""
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return ENGINE
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return None  # the reader that opens it reports why it cannot
    if head.startswith((_ZIP, _PICKLE)) or (len(head) == 9 and head[8:9] == b"{"):  # the last: safetensors
        return CHECKPOINT
    if _looks_like_onnx(head):
        return ONNX
    return None


def _looks_like_onnx(head: bytes) -> bool:
    """ir_version (field 1, a small varint), then another ModelProto field (producer, graph, opset: varint or bytes)."""
    return (
        len(head) >= 3 and head.startswith(_ONNX_IR_VERSION) and 1 <= head[1] < 0x80 and (head[2] & 0x07) in (0, 2)
    )


def expect_exported(path: Path) -> None:
    """Refuse a checkpoint given where an exported model is read, naming it and what reads it."""
    if kind_of(path) == CHECKPOINT:
        raise UserError(f"{path} is {CHECKPOINT}, not an exported model.", hint=READERS[CHECKPOINT])


def expect_checkpoint(path: Path) -> None:
    """Refuse an exported model (ONNX, engine) given where a checkpoint is read, naming it and what reads it."""
    kind = kind_of(path)
    if kind in (ONNX, ENGINE):
        raise UserError(f"{path} is {kind} (an exported model), not a checkpoint.", hint=READERS[kind])
