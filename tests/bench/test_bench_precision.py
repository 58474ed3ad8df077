"""Precision as a bench dimension: fp32 and int8 side by side, each against its own dense model, and its refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import fast_profile, invoke, plain
from PIL import Image

TENCH, GOLDFISH = "n01440764", "n01443537"  # ImageNet classes 0 and 1


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)).save(folder / f"image{i}.jpg")


def data(root: Path, per_class: int) -> Path:
    write_images(root / TENCH, per_class, seed=1)
    write_images(root / GOLDFISH, per_class, seed=2)
    return root


def results(folder: Path) -> tuple[dict, list[dict]]:
    with (folder / "results.csv").open() as f:
        return json.loads((folder / "results.json").read_text()), list(csv.DictReader(f))


@pytest.mark.slow
def test_bench_puts_fp32_and_int8_side_by_side_calibrating_on_images_it_does_not_measure(exported):
    fast_profile("cpu")
    data(Path("data"), 4)
    result = invoke("bench", exported, "--profile", "cpu", "--data", "data", "--precision", "fp32", "--precision",
                    "int8", "--calibration-images", 3, "--out", "out")
    assert result.exit_code == 0, result.output
    summary, rows = results(Path("out"))
    variants = {v["key"]: v for v in summary["variants"]}
    assert list(variants) == ["pytorch_dense", "pytorch_ats", "exported_dense:fp32", "exported_ats:fp32",
                              "exported_dense:int8", "exported_ats:int8"]
    assert summary["data"]["images"] == 8 - 3, "the calibration images are not measured"
    assert "the first 3 images of --data data, not measured" in summary["data"]["int8_calibration"]
    assert summary["speedup_baseline"] == "exported_dense:fp32"
    assert variants["exported_ats:int8"]["runtime"] == "onnxruntime CPU int8"
    assert summary["model"]["measured_files"]["int8"].endswith("quantized to int8 by bench")
    for key in ("exported_ats:fp32", "exported_ats:int8"):
        assert "speedup_own_dense" in variants[key]
        assert variants[key]["gflops"] < variants[key.replace("ats", "dense")]["gflops"]
        accuracy = variants[key]["accuracy"]
        assert variants[key]["accuracy_se"] == pytest.approx(np.sqrt(accuracy * (1 - accuracy) / 5))
    assert "speedup_own_dense" not in variants["exported_dense:int8"]
    # fp32 is compared patch for patch; int8 by agreement with the float32 reference (docs/ATS.md section 6)
    assert list(summary["comparisons"]) == ["exported_ats:fp32"]
    assert summary["comparisons"]["exported_ats:fp32"]["mismatches"] == []
    agreement = summary["agreements"]["exported_ats:int8"]
    assert agreement["images"] == 5 and 0 <= agreement["top1_agree"] <= 1
    assert len(agreement["same_tokens_per_stage"]) == 9
    assert [(row["variant"], row["runtime"]) for row in rows][2:] == [
        ("exported dense", "onnxruntime CPU fp32"), ("exported ATS", "onnxruntime CPU fp32"),
        ("exported dense", "onnxruntime CPU int8"), ("exported ATS", "onnxruntime CPU int8"),
    ]
    output = plain(result.output)
    assert "vs own dense" in output and "±" in output
    assert "exported ATS (onnxruntime CPU int8) vs PyTorch ATS (float32): top-1 agree" in output


def test_a_calibration_folder_of_its_own_leaves_every_data_image_measured(exported, tmp_path):
    from ats_deploy.bench import run

    data(Path("data"), 2)
    calibration = data(tmp_path / "calibration", 2)
    plan = run.plan(run.Request(profile="cpu", model=exported, data=Path("data"), precisions=["int8"],
                                calibration=calibration, calibration_images=3))
    assert len(plan.data.files) == 4
    assert plan.calibration.source == f"3 images of --calibration {calibration}"
    classes_in_turn = [calibration / TENCH, calibration / GOLDFISH, calibration / TENCH]
    assert [file.parent for file in plan.calibration.files] == classes_in_turn
    assert [(t.name, t.precision, t.quantize) for t in plan.targets] == [("onnxruntime", "int8", True)]


def test_two_precisions_on_the_profiles_backend_are_one_backend_not_an_override(exported):
    """fp32 and int8 on onnxruntime are two targets of one backend: the report says "onnxruntime", not overridden."""
    from ats_deploy.bench import run

    data(Path("data"), 2)
    plan = run.plan(run.Request(profile="cpu", model=exported, data=Path("data"), precisions=["fp32", "int8"],
                                calibration_images=2))
    assert [(t.name, t.precision) for t in plan.targets] == [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    assert plan.backend == plan.profile.backend == "onnxruntime"  # what BenchResult.overridden compares


def test_a_profile_that_says_int8_benches_int8_from_the_fp32_export(exported):
    from ats_deploy.bench import run

    fast_profile("cpu")
    text = Path("profiles/cpu.yaml").read_text().replace("precision: fp32", "precision: int8")
    Path("profiles/cpu-int8.yaml").write_text(text)
    data(Path("data"), 3)
    plan = run.plan(run.Request(profile="cpu-int8", model=exported, data=Path("data"), calibration_images=2))
    assert plan.precision == "int8" and plan.target.quantize
    assert len(plan.data.files) == 6 - 2 and plan.calibration.source.startswith("the first 2 images of --data")
    measured = {path for path, _ in plan.data.files}
    assert not measured & set(plan.calibration.files), "calibration and measured images are disjoint"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "int8"], "int8 is calibrated on real images: give --calibration DIR, or --data DIR"),
        (["--precision", "fp16"], "--precision fp16: the onnxruntime CPU backend does not run fp16 (it runs fp32, "
                                  "int8); fp16 runs on: tensorrt, onnxruntime-cuda, onnxruntime-tensorrt"),
        (["--precision", "int4"], "unknown precision 'int4'; choose one of: fp32, fp16, int8"),
        (["--precision", "int8", "--data", "data", "--calibration-images", 4],
         "--data data holds 4 images: int8 calibrates on the first 4 of them and measures the others"),
        (["--precision", "int8", "--data", "data", "--calibration", "missing"], "calibration folder missing does not"),
    ],
)
def test_a_precision_bench_cannot_run_is_refused_before_any_work(exported, args, message):
    data(Path("data"), 2)
    result = invoke("bench", exported, "--profile", "cpu", *args, "--out", "out")
    assert result.exit_code != 0
    assert message in plain(result.output), result.output
    assert "Traceback" not in result.output and not Path("out").exists()


def test_an_int8_export_is_benched_as_int8_and_cannot_run_fp32(here, tiny_ats_onnx):
    import onnx

    model = onnx.load(str(tiny_ats_onnx))  # labelled int8, as `export --precision int8` labels its file
    kept = [prop for prop in model.metadata_props if prop.key != "precision"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key="precision", value="int8")
    onnx.save(model, str(here / "tiny.int8.onnx"))
    result = invoke("bench", "tiny.int8.onnx", "--profile", "cpu", "--precision", "fp32", "--precision", "int8")
    assert result.exit_code != 0
    assert "tiny.int8.onnx is an int8 export: it cannot run fp32" in plain(result.output), result.output
    assert "--precision fp32 --precision int8" in plain(result.output)


# --------------------------------------------------------------------------- tune: precision as a search dimension


def _log(path: Path) -> tuple[dict, dict, list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return records[0], records[1], records[2:]


@pytest.mark.slow
def test_tune_chooses_among_precisions_and_writes_the_chosen_one_into_the_profile(exported, monkeypatch):
    from ats_deploy.bench.tune import search
    from ats_deploy.profiles import load_profile

    monkeypatch.setattr(search, "COARSE", (1.0, 0.5))  # two settings per precision, no refinement: a small run
    monkeypatch.setattr(search, "ROUNDS", 0)
    fast_profile("cpu")
    write_images(Path("data"), 8, seed=3)  # a flat folder: scored by agreement with the PyTorch dense model
    result = invoke("tune", "--profile", "cpu", "--data", "data", "--max-drop", 100, "--precision", "fp32",
                    "--precision", "int8", "--calibration-images", 3)
    assert result.exit_code == 0, result.output
    lanes = {name: _log(Path(f"profiles/cpu-tuned.{name}.log.jsonl")) for name in ("fp32", "int8")}
    for name, (header, dense, settings) in lanes.items():
        assert header["conditions"]["precision"] == name and dense["kind"] == "dense"
        assert header["conditions"]["images"] == 8 - 3, "no precision measures int8's calibration images"
        assert [s["keep"] for s in settings] == [[1.0] * 9, [0.5] * 9]
    # Every setting meets a 100-point drop: the choice is the fastest setting of either precision.
    name, fastest = min(((n, s) for n, (_, _, settings) in lanes.items() for s in settings),
                        key=lambda pair: pair[1]["p50_ms"])
    profile = load_profile("profiles/cpu-tuned.yaml")
    assert profile.precision == name and profile.keep_for(9) == fastest["keep"]
    comments = plain(" ".join(line for line in Path("profiles/cpu-tuned.yaml").read_text().splitlines()
                              if line.startswith("#")))
    assert f"Precision: {name}, chosen among fp32, int8" in comments
    assert "Pareto front over (precision, keep)" in comments
    assert Path("profiles/cpu-tuned.pareto.png").is_file()


@pytest.mark.slow
def test_tune_at_one_precision_writes_it_into_the_profile(exported, monkeypatch):
    """`tune --precision int8` on the fp32 `cpu` profile: the tuned profile runs int8, as it was measured."""
    from ats_deploy.bench.tune import search
    from ats_deploy.profiles import load_profile

    monkeypatch.setattr(search, "COARSE", (1.0, 0.5))
    monkeypatch.setattr(search, "ROUNDS", 0)
    fast_profile("cpu")
    write_images(Path("data"), 6, seed=4)
    result = invoke("tune", "--profile", "cpu", "--data", "data", "--max-drop", 100, "--precision", "int8",
                    "--calibration-images", 3)
    assert result.exit_code == 0, result.output
    assert load_profile("cpu").precision == "fp32"
    assert load_profile("profiles/cpu-tuned.yaml").precision == "int8"


def test_tune_refuses_a_precision_its_backend_cannot_run_before_measuring(exported):
    write_images(Path("data"), 4, seed=3)
    result = invoke("tune", "--profile", "cpu", "--data", "data", "--max-drop", 1, "--precision", "fp32",
                    "--precision", "fp16")
    assert result.exit_code != 0
    assert "--precision fp16: the onnxruntime CPU backend does not run fp16" in plain(result.output), result.output
    assert not Path("profiles").exists() or not list(Path("profiles").glob("*.jsonl"))
