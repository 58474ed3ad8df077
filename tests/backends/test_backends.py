"""The backend registry, and the OpenVINO backend that proves it: OpenVINO's results against the PyTorch reference
by validation's own comparison (kept patches, flips only where a replay confirms them), beside onnxruntime's,
and OpenVINO in bench (alone, and side by side with onnxruntime) and in tune.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import fast_profile, invoke, plain
from PIL import Image

from ats_deploy import backends
from ats_deploy import precision as precisions
from ats_deploy.backends import RunOptions
from ats_deploy.bench.tune import search
from ats_deploy.checkpoints import load_model
from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.exporters.compare import Case, Judge, compare_batch, reference_samples
from ats_deploy.exporters.validate import folder_inputs
from ats_deploy.images import data_config, preprocess, random_images
from ats_deploy.profiles import load_profile

EXPORTED = ("onnxruntime", "openvino")
KEEP = [0.6] * 9
SIDE_BY_SIDE = [
    "pytorch_dense",
    "pytorch_ats",
    "exported_dense:onnxruntime",
    "exported_ats:onnxruntime",
    "exported_dense:openvino",
    "exported_ats:openvino",
]


# --------------------------------------------------------------------------- the registry


def test_an_unknown_backend_is_refused_listing_the_known_ones():
    with pytest.raises(UserError) as caught:
        backends.get("tflite")
    message = str(caught.value)
    assert "unknown backend 'tflite'" in message
    for name in backends.names():
        assert name in message
    assert {"onnxruntime", "openvino", "tensorrt", "pytorch"} <= set(backends.names())


def test_every_backend_declares_what_bench_and_profiles_read():
    for backend in backends.all_backends():
        assert backends.get(backend.name) is backend
        assert backend.label and backend.runtime and backend.precisions
        assert set(backend.precisions) <= set(precisions.names())
        assert backend.unavailable() is None or isinstance(backend.unavailable(), str)
        assert backend.device in ("cpu", "gpu")
        assert backend.device == "cpu" or backend.default_threads is None  # threads apply on CPUs only
    assert backends.get("openvino").version()  # installed with the project
    assert [b.name for b in backends.all_backends() if b.device == "gpu"] == [
        "tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt"
    ]


def test_the_registry_imports_no_runtime():
    """Profiles and the CLI's --help read the registry: it loads no runtime, model or graph library."""
    import subprocess

    heavy = ("torch", "onnx", "onnxruntime", "numpy")
    code = f"import sys, ats_deploy.backends; print([m for m in {heavy} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_backend_runs_a_converted_copy_only_of_a_precision_it_does_not_run_natively(tiny_ats_onnx, tmp_path):
    """fp16 on the CUDA provider is the converted copy; the TensorRT provider's own flag and an engine (which holds
    its precision) run the file given; fp32 and int8 (calibrated at export) convert nothing."""
    import onnx

    from ats_deploy.exporters import prepare

    converted = prepare.runnable(backends.get("onnxruntime-cuda"), tiny_ats_onnx, "fp16", tmp_path)
    assert converted == tmp_path / f"{tiny_ats_onnx.stem}.fp16.onnx"
    graph = onnx.load(str(converted))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    unchanged = [("onnxruntime-tensorrt", "fp16"), ("tensorrt", "fp16"), ("onnxruntime", "fp32"), ("openvino", "int8")]
    for name, precision in unchanged:
        assert prepare.runnable(backends.get(name), tiny_ats_onnx, precision, tmp_path) == tiny_ats_onnx, name
    assert sorted(tmp_path.iterdir()) == [converted]


def test_a_backend_whose_dependency_is_missing_says_why_and_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    openvino = backends.get("openvino")
    assert openvino.unavailable() == "OpenVINO is not installed (pip install openvino)"
    assert openvino.version() is None
    assert "openvino" in backends.names(), "a backend missing here stays listed, with its reason"
    with pytest.raises(BackendUnavailable) as caught:
        backends.require("openvino", "cpu-openvino", overridden=False)
    message = str(caught.value)
    assert "profile 'cpu-openvino' runs on openvino, which is not available here: OpenVINO is not installed" in message
    assert "--backend onnxruntime" in message
    with pytest.raises(BackendUnavailable, match="--backend openvino is not available"):
        backends.require("openvino", "cpu", overridden=True)


def test_profiles_take_their_backend_rules_from_the_registry():
    from ats_deploy.profiles import parse_profile

    data = {
        "description": "d", "source": "s", "backend": "openvino", "precision": "fp16", "keep": 0.6, "batch": 1,
        "shapes": {"min": 1, "opt": 1, "max": 1}, "warmup": 1, "iterations": 1,
    }
    with pytest.raises(UserError, match="'precision' fp16 is not useful on the OpenVINO CPU backend; use fp32"):
        parse_profile(data, "x", None)
    with pytest.raises(UserError, match="'dla_core' only applies to the tensorrt backend, not 'openvino'"):
        parse_profile({**data, "precision": "fp32", "dla_core": 0}, "x", None)
    assert parse_profile({**data, "precision": "fp32"}, "x", None).backend == "openvino"


# --------------------------------------------------------------------------- OpenVINO against the reference


def against_reference(backend: str, path: Path, model, names, images: torch.Tensor, batch: int) -> Case:
    """Validation's comparison of ``backend`` running ``path`` with the reference, ``batch`` images at a time."""
    runner = backends.get(backend).open(path, RunOptions(threads=2))
    keep = torch.tensor(KEEP, dtype=torch.float32)
    case, judge = Case(keep=KEEP, batch=batch), Judge(model, 1e-3)
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        observed = runner.samples(chunk, keep)
        compare_batch(case, judge, names[start : start + batch], chunk, keep, observed,
                      reference_samples(model, chunk, keep))
    return case


def photos_and_random(model, photos, count: int = 16) -> tuple[list[str], torch.Tensor]:
    names, pictures = photos
    config = data_config(model.vit)
    real = preprocess(pictures, config)[:count]
    extra = count - len(real)
    images = torch.cat([real, random_images(extra, config, seed=3)])
    return [*names[: len(real)], *(f"random{i}" for i in range(extra))], images


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", EXPORTED)
def test_results_equal_the_reference_on_photos_and_random_images(tiny_ats_onnx, photos, backend, batch):
    model = load_model("random:0", arch="deit_tiny_patch16_224")
    names, images = photos_and_random(model, photos)
    case = against_reference(backend, tiny_ats_onnx, model, names, images, batch)
    assert case.ok, case.failures
    assert case.positions, "both backends report the patches every stage kept"
    assert case.images == 16 and case.stage_total == 16 * 9
    assert case.stage_matches >= case.stage_total - 9 * len(case.flips), "only a confirmed flip moves a patch"


@pytest.fixture(scope="module")
def real_export(tmp_path_factory, real_deit_tiny) -> Path:
    from ats_deploy.exporters.onnx_export import ExportOptions, export

    path = tmp_path_factory.mktemp("real") / "deit_tiny_ats.onnx"
    return export(real_deit_tiny, path, ExportOptions(dynamic=True, source="real"))


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_real_deit_tiny_on_openvino_matches_the_reference_as_onnxruntime_does(
    real_export, real_deit_tiny, imagenet_sample, batch
):
    from rich.console import Console

    names, images = folder_inputs(real_deit_tiny, imagenet_sample, 16, Console(quiet=True))
    cases = {b: against_reference(b, real_export, real_deit_tiny, names, images, batch) for b in EXPORTED}
    for backend, case in cases.items():
        assert case.ok, (backend, case.failures)
        assert case.positions and case.images == len(names)
        assert case.top1_matches >= len(names) - len(case.flips)


def test_openvino_runs_f32_and_a_dense_export_without_keep(tiny_ats_onnx, tmp_path):
    """The compiled model is asked what it runs (not bf16), and a model without a keep input is fed none."""
    import openvino.properties.hint as hints
    from openvino import Type

    from ats_deploy.exporters.onnx_export import ExportOptions, export
    from ats_deploy.model import build

    model = load_model("random:0", arch="deit_tiny_patch16_224")
    runner = backends.get("openvino").open(tiny_ats_onnx, RunOptions(threads=1))
    assert runner.compiled.get_property(hints.inference_precision) == Type.f32
    dense = build(model.vit, model.arch, stages=[])
    dense_file = export(dense, tmp_path / "dense.onnx", ExportOptions(dynamic=True))
    images = random_images(2, data_config(model.vit))
    logits, tokens = backends.get("openvino").open(dense_file, RunOptions(threads=1))(images, torch.zeros(0))
    with torch.inference_mode():
        expected, _ = dense(images, torch.zeros(0))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-3, rtol=0)
    assert tokens.shape == (2, 0)


# --------------------------------------------------------------------------- bench and tune


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    data = json.loads((folder / "results.json").read_text())
    with (folder / "results.csv").open() as f:
        return data, list(csv.DictReader(f))


def test_the_cpu_openvino_profile_loads_and_benches(exported):
    fast_profile("cpu-openvino")
    assert load_profile("cpu-openvino").backend == "openvino"
    result = invoke("bench", exported, "--profile", "cpu-openvino", "--images", "2", "--out", "out")
    assert result.exit_code == 0, result.output
    data, rows = read_results(Path("out"))
    assert data["backend"] == "openvino" and data["backend_overridden"] is False and data["precision"] == "fp32"
    assert [v["key"] for v in data["variants"]] == ["pytorch_dense", "pytorch_ats", "exported_dense", "exported_ats"]
    assert {v["runtime"] for v in data["variants"][2:]} == {"OpenVINO CPU"}
    assert data["comparison"]["compared"] == "kept patches" and data["comparison"]["mismatches"] == []
    assert "comparisons" not in data
    environment = data["environment"]
    assert environment["runtimes"]["openvino"] == backends.get("openvino").version()
    assert environment["threads"]["openvino"] == 1
    assert {row["backend"] for row in rows} == {"openvino"}
    assert "OpenVINO CPU" in plain(result.output)


def test_bench_shows_two_backends_side_by_side(exported):
    fast_profile("cpu")
    result = invoke("bench", exported, "--profile", "cpu", "--backend", "onnxruntime", "--backend", "openvino",
                    "--images", "2", "--out", "out")
    assert result.exit_code == 0, result.output
    data, rows = read_results(Path("out"))
    label = "onnxruntime, openvino (overridden; profile says onnxruntime)"
    assert data["backend"] == label and data["backend_overridden"] is True
    variants = {v["key"]: v for v in data["variants"]}
    assert list(variants) == SIDE_BY_SIDE
    assert variants["exported_ats:openvino"]["runtime"] == "OpenVINO CPU"
    assert variants["exported_ats:onnxruntime"]["runtime"] == "onnxruntime CPU"
    assert data["speedup_baseline"] == "exported_dense:onnxruntime"
    assert variants["exported_dense:onnxruntime"]["speedup"] == 1.0
    for key in ("exported_ats:onnxruntime", "exported_ats:openvino"):
        assert variants[key]["gflops"] < variants["exported_dense:openvino"]["gflops"]
        comparison = data["comparisons"][key]
        assert comparison["compared"] == "kept patches" and comparison["mismatches"] == []
        assert comparison["images"] == 2
    assert data["comparison"] == {**data["comparisons"]["exported_ats:onnxruntime"],
                                  "between": "exported ATS vs PyTorch ATS"}
    assert data["model"]["measured_files"] == {"onnxruntime": str(exported), "openvino": str(exported)}
    assert data["environment"]["threads"]["onnxruntime"] == data["environment"]["threads"]["openvino"] == 1
    assert [(row["variant"], row["runtime"]) for row in rows][2:] == [
        ("exported dense", "onnxruntime CPU"), ("exported ATS", "onnxruntime CPU"),
        ("exported dense", "OpenVINO CPU"), ("exported ATS", "OpenVINO CPU"),
    ]
    output = plain(result.output)
    assert "exported ATS (OpenVINO CPU) vs PyTorch ATS" in output
    assert "exported ATS (onnxruntime CPU) vs PyTorch ATS" in output
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(
        ["results.json", "results.csv", "accuracy_vs_latency.png", "accuracy_vs_gflops.png", "kept_tokens.png"]
    )


def test_bench_refuses_an_unknown_backend_among_several(exported):
    result = invoke("bench", exported, "--profile", "cpu", "--backend", "onnxruntime", "--backend", "tflite")
    assert result.exit_code != 0
    assert "unknown --backend 'tflite'; choose one of: tensorrt, onnxruntime" in plain(result.output)
    assert "Traceback" not in result.output


def test_tune_on_the_cpu_openvino_profile(exported, monkeypatch):
    """A short search (two coarse settings, no refinement) on OpenVINO writes a tuned openvino profile."""
    monkeypatch.setattr(search, "COARSE", (1.0, 0.6))
    monkeypatch.setattr(search, "ROUNDS", 0)
    fast_profile("cpu-openvino")
    folder = Path("data") / "n01440764"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
    result = invoke("tune", exported, "--profile", "cpu-openvino", "--data", "data", "--max-drop", "100")
    assert result.exit_code == 0, result.output
    tuned = load_profile("profiles/cpu-openvino-tuned.yaml")
    assert tuned.backend == "openvino" and tuned.precision == "fp32"
    header = json.loads(Path("profiles/cpu-openvino-tuned.log.jsonl").read_text().splitlines()[0])
    assert header["conditions"]["backend"] == "openvino"
    assert "openvino" in plain(result.output)
