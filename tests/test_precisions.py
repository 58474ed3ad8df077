"""The precision registry: the names profiles accept, what each converts, and which backends run it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ats_deploy import backends
from ats_deploy.errors import UserError
from ats_deploy.exporters import precisions
from ats_deploy.profiles import PRECISIONS, parse_profile


def test_the_registry_names_fp32_first_and_profiles_accept_exactly_its_names():
    assert precisions.names()[:2] == ("fp32", "fp16")
    assert precisions.names() == PRECISIONS


def test_an_unknown_precision_is_refused_listing_the_known_ones():
    with pytest.raises(UserError) as caught:
        precisions.get("bf16")
    assert "unknown precision 'bf16'" in str(caught.value)
    for name in precisions.names():
        assert name in str(caught.value)


def test_every_backend_runs_registered_precisions_only_and_fp32_everywhere():
    for backend in backends.all_backends():
        assert set(backend.precisions) <= set(precisions.names()), backend.name
    assert set(precisions.get("fp32").backends()) == set(backends.names())
    assert {"tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt"} <= set(precisions.get("fp16").backends())
    assert "onnxruntime" not in precisions.get("fp16").backends(), "the CPU provider runs fp32 only"


def test_fp32_is_the_identity_and_fp16_keeps_the_sampling_in_float32():
    fp32, fp16 = precisions.get("fp32"), precisions.get("fp16")
    marker = object()
    assert not fp32.converted and fp32.convert(marker) is marker  # type: ignore[arg-type]
    assert fp32.tensorrt_flag is None
    assert fp16.converted and fp16.tensorrt_flag == "FP16"
    # ATS_SPEC.md section 5: a reduced precision keeps the budget, quantiles, cdf and sampling in float32.
    assert set(precisions.ATS_FLOAT32) <= set(fp16.keeps_float32)
    assert 0 < fp16.min_top1_agreement <= 1


def test_a_profile_precision_must_be_in_the_registry_and_run_by_its_backend():
    data = {
        "description": "t", "source": "t", "backend": "onnxruntime-cuda", "precision": "fp16", "keep": 0.7,
        "batch": 1, "shapes": {"min": 1, "opt": 1, "max": 1}, "warmup": 1, "iterations": 1,
    }
    assert parse_profile(data, "cuda-fp16", None).precision == "fp16"
    with pytest.raises(UserError, match=r"'precision' is 'fp8', which is not one of: fp32, fp16"):
        parse_profile({**data, "precision": "fp8"}, "cuda-fp8", None)
    with pytest.raises(UserError, match=r"'precision' fp16 is not useful on the onnxruntime CPU backend"):
        parse_profile({**data, "backend": "onnxruntime"}, "cpu-fp16", None)


def test_reading_profiles_does_not_load_a_converter():
    """The loader (and `ats-deploy --help`) read the registry's names without importing onnx."""
    code = "import sys, ats_deploy.profiles; print('onnx' in sys.modules, 'numpy' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert shown.split() == ["False", "False"]
