"""The command line as a user meets it: help, the happy paths, and one clear message per mistake."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from cli_helpers import invoke, plain
from conftest import SHARED_WEIGHTS

from ats_deploy import __version__

RANDOM = ["random:0", "--arch", "deit_tiny_patch16_224"]




def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"ats-deploy {__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("inspect", "convert", "predict", "export", "check"):
        assert name in result.stdout


def test_inspect_random_model():
    result = invoke("inspect", *RANDOM)
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "deit_tiny_patch16_224" in out and "3,4,5,6,7,8,9,10,11" in out and "1.25" in out


def test_convert_then_inspect_keeps_stages_and_keep(tmp_path):
    target = tmp_path / "deit_t_ats.pt"
    result = invoke("convert", *RANDOM, "--stages", "4-6", "--keep", "0.8,0.7,0.6", "-o", target)
    assert result.exit_code == 0, result.output
    out = plain(invoke("inspect", target).stdout)
    assert "4,5,6" in out and "0.8,0.7,0.6" in out and "ats-deploy" in out


def test_predict_names_the_cat(tmp_path):
    if not SHARED_WEIGHTS.exists():
        pytest.skip(f"real DeiT-Tiny weights not found at {SHARED_WEIGHTS}")
    result = invoke("predict", SHARED_WEIGHTS, "skimage:chelsea", "--keep", "0.7")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert re.search(r"Egyptian cat|tabby|tiger cat", out)
    assert "kept tokens per stage" in out and "GFLOPs" in out


def test_export_dynamic_validates_and_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("export", *RANDOM, "--dynamic")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "validated" in out and "FAIL" not in out
    onnx_file = tmp_path / "deit_tiny_patch16_224_ats.onnx"
    assert onnx_file.exists()
    assert invoke("check", onnx_file, "--target", "tensorrt-10", "--target", "onnxruntime").exit_code == 0
    refused = invoke("check", onnx_file, "--target", "dla")
    assert refused.exit_code != 0 and "not compatible with dla" in plain(refused.output)


def test_export_static_from_a_profile(tmp_path):
    out = tmp_path / "static.onnx"
    result = invoke("export", *RANDOM, "--profile", "cpu", "-o", out, "--no-validate")
    assert result.exit_code == 0, result.output
    assert "static (batch 1, keep baked in)" in plain(result.stdout)
    assert invoke("check", out, "--target", "dla").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "random:0", "--arch", "nosuch_vit"], "nosuch_vit"),
        (["export", "random:0"], "--arch"),
        (["export", *RANDOM, "--stages", "3-12"], "outside the model's blocks 0-11"),
        (["export", *RANDOM, "--keep", "0.5,0.5"], "2 values but the model has 9 ATS stages"),
        (["export", *RANDOM, "--keep", "nan"], "keep value nan is invalid"),
        (["export", *RANDOM, "--keep", "inf"], "keep value inf is invalid"),
        (["export", *RANDOM, "--keep", "0"], "keep value 0.0 is invalid"),
        (["export", *RANDOM, "--keep", "abc"], "cannot read --keep"),
        (["export", *RANDOM, "-o", "/nonexistent-dir/x.onnx"], "does not exist"),
        (["export", *RANDOM, "--exporter", "jit"], "unknown --exporter"),
        (["export", *RANDOM, "--ats-op", "custom", "--exporter", "dynamo"], "needs --exporter torchscript"),
        (["export", *RANDOM, "--ats-op", "plugin"], "unknown --ats-op"),
        (["export", *RANDOM, "--img-size", "200"], "not a positive multiple of the patch size 16"),
        (["export", *RANDOM, "--profile", "nosuch-device"], "nosuch-device"),
        (["export", "missing.pt"], "missing.pt"),
        (["inspect", "."], "directory"),
        (["check", "missing.onnx"], "missing.onnx"),
        (["predict", *RANDOM, "skimage:nosuchphoto"], "nosuchphoto"),
        (["predict", *RANDOM, "nosuch.jpg"], "image not found"),
    ],
)
def test_user_errors_are_one_clear_message(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in plain(result.output)
    assert "Traceback" not in result.output
    assert not list(Path(tmp_path).glob("*.onnx")), "no half-written output"


def test_export_with_custom_ops_validates_and_builds_with_the_plugin_note(tmp_path):
    out = tmp_path / "custom.onnx"
    result = invoke("export", *RANDOM, "--dynamic", "--ats-op", "custom", "-o", out)
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.stdout)
    built = invoke("build", out, "--profile", "jetson")
    assert "plain trtexec cannot load" in plain(built.output)
    assert built.exit_code != 0 and "TensorRT" in plain(built.output)


def test_export_at_another_input_size(tmp_path):
    out = tmp_path / "small.onnx"
    result = invoke("export", *RANDOM, "--dynamic", "--img-size", "160", "--stages", "4,8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.stdout)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 160, 160]


def test_corrupt_onnx_is_one_clear_message(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    result = invoke("check", bad)
    assert result.exit_code != 0 and "not a valid ONNX model" in plain(result.output)
