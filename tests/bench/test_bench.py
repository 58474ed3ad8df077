"""`ats-deploy bench` and `ats-deploy profiles`: results files, model discovery, backends, data and class maps.

Full bench runs use fast copies of the built-in profiles in ./profiles/ (a local
profile overrides the built-in of its name), so ``--profile cpu`` measures a few
iterations on one thread instead of a hundred.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import fast_profile, invoke, plain
from PIL import Image
from typer.testing import CliRunner

from ats_deploy.artifact import read
from ats_deploy.bench import run, tune
from ats_deploy.bench.source import check_static, engine_for
from ats_deploy.bench.timing import Latency, interleaved, paired_ratio
from ats_deploy.checkpoints import load_model, load_reference, save_checkpoint
from ats_deploy.cli import app
from ats_deploy.data import image_folder, read_class_map
from ats_deploy.errors import UserError
from ats_deploy.exported import Exported, changed_source, open_model
from ats_deploy.profiles import dump_profile, load_profile

VARIANTS = ["pytorch_dense", "pytorch_ats", "exported_dense", "exported_ats"]
PLOTS = ["accuracy_vs_latency.png", "accuracy_vs_gflops.png", "kept_tokens.png"]
TENCH, GOLDFISH, BRAMBLING = "n01440764", "n01443537", "n01530575"  # ImageNet classes 0, 1 and 10





def write_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.jpg")




def read_results(folder: Path) -> tuple[dict, list[dict]]:
    data = json.loads((folder / "results.json").read_text())
    with (folder / "results.csv").open() as f:
        return data, list(csv.DictReader(f))


def test_bench_end_to_end_with_an_image_folder(exported):
    fast_profile("cpu")
    write_images(Path("data") / TENCH, 2, seed=1)
    write_images(Path("data") / GOLDFISH, 2, seed=2)
    (Path("data") / TENCH / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = invoke("bench", exported, "--profile", "cpu", "--data", "data", "--out", "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("out").iterdir()) == sorted(["results.json", "results.csv", *PLOTS])
    data, rows = read_results(Path("out"))
    assert data["backend"] == "onnxruntime" and data["backend_overridden"] is False
    assert data["profile"]["name"] == "cpu" and data["batch"] == 1
    assert data["keep"] == [0.6] * 9 and data["keep_origin"] == "profile 'cpu'"
    assert data["data"]["images"] == 4
    assert data["data"]["skipped_corrupt"] == 1
    assert data["data"]["skipped_files"][0]["file"] == f"{TENCH}/broken.jpg"
    assert data["data"]["labels"] == "ImageNet wnids"
    assert data["accuracy_metric"] == "top-1 accuracy"
    variants = {v["key"]: v for v in data["variants"]}
    assert list(variants) == VARIANTS
    for v in variants.values():
        assert 0.0 <= v["accuracy"] <= 1.0
        assert set(v["latency"]) >= {"p50_ms", "p90_ms", "p99_ms", "throughput_images_per_s"}
        assert v["latency"]["iterations"] == 2
    assert variants["exported_dense"]["speedup"] == 1.0
    assert variants["exported_ats"]["gflops"] < variants["exported_dense"]["gflops"]
    assert len(variants["exported_ats"]["mean_tokens_per_stage"]) == 9
    assert variants["pytorch_dense"]["mean_tokens_per_stage"] == []
    comparison = data["comparison"]
    assert comparison["images"] == 4 and comparison["stages_total"] == 36 and comparison["compared"] == "kept patches"
    assert comparison["mismatches"] == []  # a token that moved at a float tie is listed under "flips" instead
    environment = data["environment"]
    assert environment["cores"] and environment["cpu"] and environment["runtimes"]["onnxruntime"]
    assert environment["threads"]["pytorch"] == 1 and environment["threads"]["onnxruntime"] == 1
    assert [row["variant"] for row in rows] == ["PyTorch dense", "PyTorch ATS", "exported dense", "exported ATS"]
    assert {row["backend"] for row in rows} == {"onnxruntime"}
    assert "1 unreadable file skipped" in plain(result.output)


def test_a_flat_folder_is_unlabelled_and_scored_by_agreement(exported):
    fast_profile("cpu")
    write_images(Path("photos"), 3, seed=3)
    result = invoke("bench", exported, "--profile", "cpu", "--data", "photos", "--out", "out")
    assert result.exit_code == 0, result.output
    data, _ = read_results(Path("out"))
    assert data["accuracy_metric"] == "top-1 agreement with PyTorch dense"
    assert data["data"]["images"] == 3 and data["data"]["labels"] == "none"
    variants = {v["key"]: v for v in data["variants"]}
    assert variants["pytorch_dense"]["accuracy"] == 1.0, "dense agrees with itself"


def test_bench_finds_the_only_export_and_records_overrides(exported):
    fast_profile("jetson")
    result = invoke("bench", "--profile", "jetson", "--backend", "onnxruntime", "--keep", "0.5", "--images", "2",
                    "--out", "out")
    assert result.exit_code == 0, result.output
    label = "onnxruntime (overridden; profile says tensorrt)"
    assert label in plain(result.output)
    data, rows = read_results(Path("out"))
    assert data["model"]["path"] == str(exported)
    assert data["backend"] == label and data["backend_overridden"] is True
    assert data["precision"] == "fp32 (profile says fp16)"
    assert data["keep"] == [0.5] * 9 and data["keep_origin"] == "--keep"
    assert data["data"]["labelled"] is False and data["data"]["images"] == 2
    assert data["accuracy_metric"] == "top-1 agreement with PyTorch dense"
    assert {row["backend"] for row in rows} == {label}
    # Logged (not a terminal), every long pass says when it starts and ends: 12 silent minutes before (issue 23).
    lines = result.output.splitlines()
    for started, ended in [("loading the PyTorch reference ...", "loading the PyTorch reference: done in"),
                           ("exporting the dense baseline", "exporting the dense baseline"),
                           ("opening the exported ATS and dense models", "opening the exported ATS and dense models"),
                           ("accuracy: 4 variants on 2 images: 0/2", "accuracy: 4 variants on 2 images: done (2/2)"),
                           ("latency: ", "latency: ")]:
        assert any(line.startswith(started) for line in lines) and any(
            line.startswith(ended) and ("done" in line) for line in lines), (started, result.output)


def test_bench_without_model_needs_exactly_one_export(here, tiny_ats_onnx):
    Path("other.onnx").write_bytes(b"not an ONNX file")
    result = invoke("bench", "--profile", "cpu")
    assert result.exit_code != 0
    output = plain(result.output)
    assert "*.onnx" in output and "ats-deploy export CHECKPOINT --dynamic" in output
    assert ".onnx files without it: other.onnx" in output
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(tiny_ats_onnx, name)
    result = invoke("bench", "--profile", "cpu")
    assert result.exit_code != 0
    assert "a.onnx, b.onnx" in plain(result.output) and "bench MODEL" in plain(result.output)


def test_an_unavailable_backend_is_refused_naming_the_override(exported):
    result = invoke("bench", exported, "--profile", "jetson")
    assert result.exit_code == 3
    assert "--backend onnxruntime" in plain(result.output)
    assert "profile 'jetson' runs on tensorrt" in plain(result.output)
    result = invoke("bench", exported, "--profile", "cpu", "--backend", "onnxruntime-cuda")
    assert result.exit_code == 3
    assert "--backend onnxruntime-cuda is not available" in plain(result.output)
    assert not Path("results").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        ([], "bench needs a device profile: --profile NAME"),
        (["--profile", "cpu", "--backend", "tflite"], "unknown --backend 'tflite'"),
        (["--profile", "cpu", "--keep", "0.5,0.5"], "keep has 2 values but the model has 9 ATS stages"),
        (["--profile", "cpu", "--data", "missing"], "data folder missing does not exist"),
        (["--profile", "cpu", "--data", "empty"], "data folder empty is empty"),
        (["--profile", "cpu", "--data", "notes"], "holds neither class folders nor image files"),
        (["--profile", "cpu", "--data", "flat", "--class-map", "map.json"], "--class-map maps class folders"),
        (["--profile", "cpu", "--data", "bad"], "none of the 2 image files of bad could be read"),
        (["--profile", "cpu", "--data", "ok", "--class-map", "map.json"], "'dog' maps to 5000"),
        (["--profile", "cpu", "--class-map", "map.json"], "give --data DIR too"),
        (["--profile", "cpu", "--out", "map.json"], "--out map.json is a file"),
    ],
)
def test_user_errors_come_before_any_work(exported, args, message):
    Path("empty").mkdir()
    Path("notes").mkdir()
    (Path("notes") / "README.txt").write_text("no images here")
    write_images(Path("flat"), 1)
    write_images(Path("ok") / "dog", 1)
    (Path("bad") / "cls").mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (Path("bad") / "cls" / name).write_bytes(b"garbage")
    Path("map.json").write_text(json.dumps({"dog": 5000}))
    result = invoke("bench", exported, *args)
    assert result.exit_code != 0
    assert message in plain(result.output)
    assert "Traceback" not in result.output


def test_an_engine_runs_only_on_tensorrt(here, tiny_ats_onnx):
    meta = read(tiny_ats_onnx).to_metadata()
    Path("model.plan").write_bytes(b"engine")
    Path("model.plan.json").write_text(json.dumps({"onnx_metadata": meta, "precision": "fp16"}))
    assert open_model(Path("model.plan")).is_engine
    result = invoke("bench", "model.plan", "--profile", "cpu")
    assert result.exit_code != 0
    assert "only the tensorrt backend runs" in plain(result.output)


def test_an_onnx_model_on_tensorrt_needs_its_engine_built_first(exported):
    with pytest.raises(UserError) as caught:
        engine_for(open_model(exported), load_profile("jetson"))
    assert f"ats-deploy build {exported} --profile jetson" in str(caught.value)


def test_wnid_folders_map_to_imagenet_indices(tmp_path):
    for wnid in (BRAMBLING, TENCH):
        write_images(tmp_path / wnid, 1)
    folder = image_folder(tmp_path, num_classes=1000)
    assert folder.labelling == "ImageNet wnids"
    assert {path.parent.name: label for path, label in folder.files} == {TENCH: 0, BRAMBLING: 10}
    assert image_folder(tmp_path, num_classes=10).labelling == "sorted folder order"


def test_classes_are_taken_in_turn_and_limited(tmp_path):
    write_images(tmp_path / "cat", 3)
    write_images(tmp_path / "dog", 3)
    folder = image_folder(tmp_path, num_classes=2, limit=4)
    assert [(path.parent.name, label) for path, label in folder.files] == [("cat", 0), ("dog", 1)] * 2


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_class_map(tmp_path, suffix):
    write_images(tmp_path / "data" / "cat", 1)
    write_images(tmp_path / "data" / "dog", 1)
    mapping = {"cat": 281, "dog": 207, "unused": 3}
    path = tmp_path / f"map{suffix}"
    path.write_text(json.dumps(mapping) if suffix == ".json" else "cat: 281\ndog: 207\nunused: 3\n")
    folder = image_folder(tmp_path / "data", num_classes=1000, class_map=path)
    assert folder.labelling == f"class map {path}"
    assert {p.parent.name: label for p, label in folder.files} == {"cat": 281, "dog": 207}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"cat": 1', "is not valid JSON"),
        ("[1, 2]", "must be a non-empty mapping"),
        ('{"cat": -1, "dog": 2}', "'cat' maps to -1"),
        ('{"cat": 1.5, "dog": 2}', "'cat' maps to 1.5"),
        ('{"cat": true, "dog": 2}', "'cat' maps to True"),
        ('{"cat": 1}', "has no entry for the folders: dog"),
    ],
)
def test_a_bad_class_map_is_refused(tmp_path, text, message):
    write_images(tmp_path / "data" / "cat", 1)
    write_images(tmp_path / "data" / "dog", 1)
    (tmp_path / "map.json").write_text(text)
    with pytest.raises(UserError, match=message):
        image_folder(tmp_path / "data", num_classes=10, class_map=tmp_path / "map.json")
    with pytest.raises(UserError, match="cannot read class map"):
        read_class_map(tmp_path / "absent.json", 10)


def test_static_exports_bake_batch_and_keep(tiny_ats_onnx):
    baked = dataclasses.replace(read(tiny_ats_onnx), dynamic=False, batch=1, keep=(0.7,) * 9, budget=(138,) * 9)
    static = Exported(Path("static.onnx"), baked)
    jetson = load_profile("jetson")
    check_static(static, [0.7] * 9, "profile 'jetson'", jetson)
    with pytest.raises(UserError, match=r"static export with keep 0.7 \(--keep asks for keep 0.5\) baked in"):
        check_static(static, [0.5] * 9, "--keep", jetson)
    with pytest.raises(UserError, match="batch 1 \\(profile 'cpu-batch' asks for batch 8\\)"):
        check_static(static, [0.7] * 9, "--keep", load_profile("cpu-batch"))


def test_the_reference_comes_from_the_recorded_checkpoint(tmp_path, tiny_ats_onnx):
    checkpoint = save_checkpoint(load_model("random:0", arch="deit_tiny_patch16_224"), tmp_path / "tiny.pt")
    recorded = dataclasses.replace(
        read(tiny_ats_onnx), stages=(3, 4), keep=(1.0, 1.0), source_checkpoint=str(checkpoint), source_sha256="0" * 64
    )
    model = load_reference(recorded, None, False, "m.onnx")
    assert model.stages == [3, 4]
    warning = changed_source(Exported(tmp_path / "m.onnx", recorded), None)
    assert warning is not None and "is not the file" in warning
    checkpoint.unlink()
    with pytest.raises(UserError, match="is gone") as caught:
        load_reference(recorded, None, False, "m.onnx")
    assert "--checkpoint PATH" in str(caught.value)


def test_latency_rounds_are_interleaved_and_warmup_excluded():
    calls: list[str] = []
    latencies = interleaved({name: lambda _, n=name: calls.append(n) for name in "abc"}, 2, warmup=2, iterations=3)
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]
    assert len(calls) == 15
    assert {name: len(lat.samples_ms) for name, lat in latencies.items()} == {"a": 3, "b": 3, "c": 3}
    assert latencies["a"].batch == 2


def test_a_paired_ratio_cancels_drift_between_rounds():
    """b takes 1.25x a in every round but two, +-10%, while the machine halves its speed after two
    rounds: the paired ratio is 1.25; the ratio of the medians, 1.125, lands on a noisy round."""
    drift = [1.0, 1.0, 2.0, 2.0, 2.0]
    a = Latency([10.0 * d for d in drift], 1)
    b = Latency([12.5 * d * e for d, e in zip(drift, [1.0, 1.0, 1.1, 0.9, 1.0], strict=True)], 1)
    assert paired_ratio(b, a) == pytest.approx(1.25)
    assert b.p50 / a.p50 == pytest.approx(1.125)
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio(b, Latency([1.0], 1))


def test_profiles_lists_builtins_and_local_files(here):
    fast_profile("cpu")
    dump_profile(load_profile("jetson"), Path("profiles") / "lab.yaml", [])
    result = CliRunner().invoke(app, ["profiles"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert {"cpu", "cpu-batch", "jetson", "jetson-dla", "desktop-gpu", "server-gpu", "lab"} <= set(lines)
    assert "./profiles/cpu.yaml" in lines["cpu"] and "./profiles/lab.yaml" in lines["lab"]
    assert plain(result.output).count("(overrides built-in)") == 1
    assert "built-in" in lines["jetson-dla"] and "tensorrt" in lines["jetson-dla"]


def test_profiles_lists_the_good_profiles_and_names_a_bad_file(here):
    fast_profile("cpu")
    Path("profiles/broken.yaml").write_text("backend: [oops\n")
    Path("profiles/cpu-batch.yaml").write_text("backend: onnxruntime\n")
    result = CliRunner().invoke(app, ["profiles"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    assert {"cpu", "jetson", "jetson-dla", "desktop-gpu", "server-gpu"} <= set(lines)
    assert "broken" not in lines and "cpu-batch" not in lines, "a bad file, and the built-in it overrides, are left out"
    output = plain(result.output)
    assert "warning: profile" in output and "broken.yaml: invalid YAML at line 2" in output
    assert "cpu-batch.yaml: missing required key 'description' (it overrides the built-in 'cpu-batch'" in output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["bench"], ["tune", "--data", "data", "--max-drop", "1"]])
def test_a_corrupt_onnx_file_is_called_corrupt(exported, command):
    Path("random.onnx").write_bytes(np.random.default_rng(0).bytes(100_000))
    Path("truncated.onnx").write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    for name in ("random.onnx", "truncated.onnx"):
        result = invoke(command[0], name, "--profile", "cpu", *command[1:])
        assert result.exit_code == 2
        output = plain(result.output)
        assert f"{name} is corrupt or not an ONNX file" in output and "Re-export it with `ats-deploy export" in output
        assert "not an ONNX file exported by ats-deploy" not in output and "Traceback" not in result.output


def test_an_unwritable_out_folder_is_refused_before_any_work(exported, read_only_dir, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("loaded the reference")

    monkeypatch.setattr(run, "load_reference", refuse)
    result = invoke("bench", exported, "--profile", "cpu", "--images", "1", "--out", read_only_dir / "out")
    assert result.exit_code == 2, result.output
    output = plain(result.output)
    assert "cannot write to" in output and "permission denied; choose another --out" in output
    assert "Traceback" not in result.output and not (read_only_dir / "out").exists()


@pytest.mark.parametrize("command", [["bench"], ["tune", "--data", "data", "--max-drop", "1"]])
def test_more_threads_than_cores_is_said_before_measuring(exported, monkeypatch, command):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    crowded = dataclasses.replace(load_profile("cpu"), threads=cores + 1, warmup=1, iterations=2)
    dump_profile(crowded, Path("profiles") / "cpu.yaml", [])
    write_images(Path("data") / "cat", 1)

    def stop(*_args, **_kwargs):
        raise UserError("stopped before measuring")

    monkeypatch.setattr(run, "load_reference", stop)
    monkeypatch.setattr(tune.Device, "dense", stop)
    result = invoke(command[0], exported, "--profile", "cpu", *command[1:])
    output = plain(result.output)
    warning = f"warning: profile 'cpu' asks for {cores + 1} threads, and this process may use {cores} CPU cores"
    assert warning in output and "stopped before measuring" in output
