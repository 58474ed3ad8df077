"""onnxruntime CPU sessions of exported files: the one factory every part of ats-deploy opens them with.

:func:`session` is what the onnxruntime CPU backend, ``runtime.open``, validation and the
benchmarks run; :class:`TappedSession` is the same session with every stage's kept tokens as
extra outputs (:func:`ats_deploy.backends.samples.taps`), for validation's patch-by-patch check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ats_deploy.keep import keep_rows
from ats_deploy.sampler_op import uses_custom_op

from ..samples import Sample, kept_positions, taps


def session(model: onnx.ModelProto | str | Path, threads: int | None = None):
    """An onnxruntime CPU session of a file or a loaded model that does not spin idle threads.

    The graph is read once (no external data) to see whether it needs the custom op's kernel.
    Every other setting is onnxruntime's default, so that an int8 file is validated, benched and
    served under the optimizer that runs it in a user's own session or Triton's onnxruntime backend.
    """
    import onnxruntime as ort

    from .kernel import register

    loaded = isinstance(model, onnx.ModelProto)
    graph = model if loaded else onnx.load(str(model), load_external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if uses_custom_op(graph):
        register(options)
    source = model.SerializeToString() if loaded else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class TappedSession:
    """An onnxruntime CPU session of an exported file that also returns every stage's kept tokens.

    The kept-token tensors become extra graph outputs; no node changes.
    """

    def __init__(self, path: str, threads: int | None = None) -> None:
        model = onnx.load(path)
        self.taps = taps(model)
        for tensors in self.taps:
            for name, dtype in tensors:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        self.session = session(model, threads)
        self.takes_keep = any(i.name == "keep" for i in self.session.get_inputs())
        tokens = next(o for o in self.session.get_outputs() if o.name == "tokens")
        self.stages = tokens.shape[-1]  # static in every export (spec section 4)

    def __call__(self, images: np.ndarray, keep: np.ndarray) -> list[Sample]:
        feeds = {"images": images}
        if self.takes_keep:
            feeds["keep"] = keep_rows(keep, len(images))
        names = [name for tensors in self.taps for name, _ in tensors]
        logits, tokens, *tapped = self.session.run(["logits", "tokens", *names], feeds)
        stages, at = [], 0
        for tensors in self.taps:
            stages.append(tapped[at : at + len(tensors)])
            at += len(tensors)
        return [Sample(logits[b], tokens[b], kept_positions(stages, b)) for b in range(len(images))]
