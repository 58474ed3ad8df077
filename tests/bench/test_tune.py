"""`ats-deploy tune`: the search, the choice, the tuned profile, the resumable log, and its user errors.

One real tune (module fixture ``tuned``) runs the tiny random DeiT-Tiny export on a fast copy of the ``cpu``
profile (1 warm-up round, 2 timed rounds, 1 thread) over images labelled with the dense model's own top-1, so
that the dense model scores 100% and token sampling can only lose. The other end-to-end tests reuse its log,
which is the point of the log: they measure nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import fast_profile, invoke, plain
from onnx import TensorProto, helper
from PIL import Image

from ats_deploy.artifact import read
from ats_deploy.bench import tune
from ats_deploy.bench.tune import Objective, pareto_front, search
from ats_deploy.checkpoints import load_model
from ats_deploy.errors import UserError
from ats_deploy.images import data_config, preprocess
from ats_deploy.keep import format_keep
from ats_deploy.model import build
from ats_deploy.profiles import dump_profile, load_profile
from ats_deploy.tune_log import LOG_VERSION, Log, Measurement

ARCH = "deit_tiny_patch16_224"
IMAGES = 8
MAX_DROP = 25.0
TUNE = ("--profile", "cpu", "--data", "data", "--class-map", "classes.json")





def labelled_by_dense(root: Path, count: int) -> Path:
    """``root/class<c>/image<i>.png`` with c the dense model's top-1 of the image; returns the class map."""
    model = load_model("random:0", arch=ARCH)
    dense = build(model.vit, model.arch, stages=[])
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)) for _ in range(count)]
    with torch.inference_mode():
        logits, _ = dense(preprocess(pictures, data_config(model.vit)), torch.zeros(0))
    top1 = logits.argmax(dim=-1).tolist()
    for i, (picture, label) in enumerate(zip(pictures, top1, strict=True)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"image{i}.png")  # lossless: the model sees the pixels it was labelled on
    class_map = root.parent / "classes.json"
    class_map.write_text(json.dumps({f"class{label}": label for label in top1}))
    return class_map


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy(record: dict) -> float:
    return record["correct"].count("1") / len(record["correct"])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_ats_onnx):
    """A folder where `tune --max-drop MAX_DROP` ran once, and that run's result."""
    folder = tmp_path_factory.mktemp("tuned")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        shutil.copy(tiny_ats_onnx, folder / tiny_ats_onnx.name)
        fast_profile("cpu")
        labelled_by_dense(folder / "data", IMAGES)
        result = invoke("tune", *TUNE, "--max-drop", MAX_DROP)
    return folder, result


@pytest.fixture
def there(tuned, monkeypatch) -> Path:
    """The current directory is the tuned folder."""
    monkeypatch.chdir(tuned[0])
    return tuned[0]


@pytest.fixture
def no_measuring(monkeypatch) -> None:
    """Any new measurement fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(tune.Device, "dense", refuse)
    monkeypatch.setattr(tune.Device, "setting", refuse)


# --------------------------------------------------------------------------- end to end


def test_max_drop_picks_the_fastest_setting_within_the_drop(tuned, there):
    result = tuned[1]
    assert result.exit_code == 0, result.output
    records = read_log(Path("profiles/cpu-tuned.log.jsonl"))
    header, dense, settings = records[0], records[1], records[2:]
    assert header["kind"] == "header" and header["conditions"]["images"] == IMAGES
    assert dense["kind"] == "dense" and accuracy(dense) == 1.0  # labelled by the dense model itself
    assert len(search.COARSE) < len(settings) <= search.evaluations_bound(9)
    assert any(accuracy(s) < 1.0 for s in settings)  # the drop constraint binds somewhere
    # Every setting went through bench's accuracy pass: the export compared with the reference, and agreeing.
    assert all(s["failures"] == [] for s in settings)
    profile = load_profile("profiles/cpu-tuned.yaml")
    keep = profile.keep_for(9)
    chosen = next(s for s in settings if s["keep"] == keep)
    assert 100 * (accuracy(dense) - accuracy(chosen)) <= MAX_DROP
    # The refinement starts from the fastest uniform setting within the drop and only moves to faster ones.
    uniform = [s for s in settings[: len(search.COARSE)] if 100 * (accuracy(dense) - accuracy(s)) <= MAX_DROP]
    assert chosen["p50_ms"] <= min(s["p50_ms"] for s in uniform)
    assert profile == dataclasses.replace(load_profile("cpu"), name="cpu-tuned", keep=profile.keep,
                                          source=profile.source)
    # The source profile's "a starting point ... Not measured" is replaced by what was measured.
    assert "starting point" not in profile.source and "Not measured" not in profile.source
    assert plain(profile.source).startswith("keep measured by `ats-deploy tune` on ")
    assert f"keep {format_keep(keep)}: top-1" in plain(profile.source) and f"{IMAGES} images" in profile.source
    assert isinstance(profile.keep, float) == (len(set(keep)) == 1)

    text = Path("profiles/cpu-tuned.yaml").read_text()
    comments = plain(" ".join(line for line in text.splitlines() if line.startswith("#")))
    for needed in ("keep tuned by `ats-deploy tune`", "Device:", "Runtimes:", "onnxruntime", f"Images: {IMAGES}",
                   "Objective: the fastest setting", "Chosen: keep", "Dense: top-1 100.0%", "GFLOPs", "p50",
                   "Limits:", "paired standard error"):
        assert needed in comments
    assert Path("profiles/cpu-tuned.pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    output = plain(result.output)
    assert f"chosen keep {format_keep(keep)}" in output and f"{IMAGES} images" in output


def test_unlabelled_images_are_scored_by_agreement_with_dense(tmp_path, monkeypatch, tiny_ats_onnx):
    """A flat folder has no labels: dense agrees with itself, every setting is scored against it."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_ats_onnx, tmp_path / tiny_ats_onnx.name)
    fast_profile("cpu")
    labelled_by_dense(tmp_path / "tree", 4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for picture in (tmp_path / "tree").rglob("*.png"):
        shutil.copy(picture, flat / picture.name)
    result = invoke("tune", "--profile", "cpu", "--data", "flat", "--latency-ms", "100000", "-o", "flat.yaml")
    assert result.exit_code == 0, result.output
    records = read_log(Path("flat.log.jsonl"))
    assert records[1]["kind"] == "dense" and accuracy(records[1]) == 1.0
    assert any(accuracy(r) < 1.0 for r in records[2:]), "settings are scored against dense, not all perfect"
    assert "top-1 agreement with PyTorch dense" in plain(Path("flat.yaml").read_text())


def test_bench_accepts_the_tuned_profile(there):
    result = invoke("bench", "--profile", "profiles/cpu-tuned.yaml", "--images", "1", "--out", "bench-out")
    assert result.exit_code == 0, result.output
    data = json.loads(Path("bench-out/results.json").read_text())
    assert data["keep"] == load_profile("profiles/cpu-tuned.yaml").keep_for(9)
    assert data["keep_origin"] == "profile 'cpu-tuned'"


def test_a_rerun_resumes_from_the_log_and_measures_nothing(there, no_measuring):
    log = Path("profiles/cpu-tuned.log.jsonl")
    before = log.read_text()
    keep = load_profile("profiles/cpu-tuned.yaml").keep
    result = invoke("tune", *TUNE, "--max-drop", MAX_DROP)
    assert result.exit_code == 0, result.output
    assert log.read_text() == before
    assert load_profile("profiles/cpu-tuned.yaml").keep == keep
    assert "0 measured now" in plain(result.output)


def test_an_impossible_latency_budget_names_the_closest_setting(there):
    # Measuring is allowed: which neighbours the latency search visits depends on timing noise,
    # so the max-drop run's log need not hold them all.
    log = Path("profiles/cpu-tuned.log.jsonl")
    result = invoke("tune", *TUNE, "--latency-ms", "0.001", "--log", log, "-o", "fast.yaml")
    assert result.exit_code == 1
    output = plain(result.output)
    assert "no measured setting runs at p50 <= 0.001 ms" in output
    named = re.search(r"The closest: keep (\S+): top-1", output)
    assert named is not None
    settings = read_log(log)[2:]
    closest = next(s for s in settings if format_keep(s["keep"]) == named[1])
    # Nothing meets the budget, so the search ranks by latency: from the fastest uniform setting on, only faster.
    assert closest["p50_ms"] <= min(s["p50_ms"] for s in settings[: len(search.COARSE)])
    assert f"p50 {closest['p50_ms']:.2f} ms" in output
    # The plot of a failed run says so in its name: no profile matches it.
    assert not Path("fast.yaml").exists() and Path("fast.failed.pareto.png").is_file()
    assert not Path("fast.pareto.png").exists()
    assert "fast.failed.pareto.png (the plot of this failed run; no profile written" in output


def test_a_failed_run_leaves_the_profile_and_its_plot_as_they_were(there, tmp_path):
    for suffix in (".yaml", ".pareto.png"):
        shutil.copy(Path("profiles") / f"cpu-tuned{suffix}", tmp_path / f"ok{suffix}")
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    log = Path("profiles/cpu-tuned.log.jsonl")
    result = invoke("tune", *TUNE, "--latency-ms", "0.001", "--log", log, "-o", tmp_path / "ok.yaml")
    assert result.exit_code == 1
    assert {path: path.read_bytes() for path in before} == before, "the profile and its plot still agree"
    assert (tmp_path / "ok.failed.pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ok.yaml is left as it was" in plain(result.output)


def test_the_choice_comes_from_every_setting_in_the_log(there, tmp_path, no_measuring):
    """A setting an earlier run measured off this run's search path still competes (here: the fastest, and exact)."""
    log = Path(shutil.copy("profiles/cpu-tuned.log.jsonl", tmp_path / "earlier.log.jsonl"))
    keep = (0.95, *[0.1] * 8)  # further from a uniform keep than the refinement's steps reach
    off_path = Measurement(keep, np.ones(IMAGES, dtype=bool), gflops=0.1, p50_ms=0.001, dense_p50_ms=1.0,
                           tokens=[187.0, *[20.0] * 8], speedup=1000.0, failures=["image0.png: logits differ"])
    with log.open("a") as handle:
        handle.write(json.dumps(off_path.to_record(197, 1)) + "\n")
    result = invoke("tune", *TUNE, "--max-drop", MAX_DROP, "--log", log, "-o", tmp_path / "choice.yaml")
    assert result.exit_code == 0, result.output
    assert load_profile(str(tmp_path / "choice.yaml")).keep == keep
    assert "0 measured now" in plain(result.output)
    # What validation's comparison found at the chosen keep is said, and written into the profile.
    warning = f"At keep {format_keep(keep)} the export disagrees with the PyTorch reference: image0.png: logits"
    assert warning in plain(result.output) and warning in plain((tmp_path / "choice.yaml").read_text())


def test_the_profiles_latency_budget_is_the_default_objective(there, tmp_path, monkeypatch, no_measuring):
    """No --max-drop or --latency-ms: the profile's latency_budget_ms is the budget, and every report says so."""
    monkeypatch.setattr(search, "COARSE", (1.0, 0.6))  # settings the fixture's run measured: nothing to measure
    monkeypatch.setattr(search, "ROUNDS", 0)
    budgeted = dataclasses.replace(load_profile("cpu"), name="budgeted", latency_budget_ms=100000.0)
    dump_profile(budgeted, tmp_path / "budgeted.yaml", ["cpu with a latency budget"])
    log = shutil.copy("profiles/cpu-tuned.log.jsonl", tmp_path / "budget.log.jsonl")
    args = ("--profile", tmp_path / "budgeted.yaml", "--data", "data", "--class-map", "classes.json")
    result = invoke("tune", *args, "--log", log, "-o", tmp_path / "out.yaml")
    assert result.exit_code == 0, result.output
    said = "with p50 <= 100000 ms (latency_budget_ms of profile 'budgeted')"
    assert said in plain(result.output) and said in plain((tmp_path / "out.yaml").read_text())
    assert load_profile(str(tmp_path / "out.yaml")).latency_budget_ms == 100000.0
    # An objective on the command line wins over the profile's budget.
    result = invoke("tune", *args, "--max-drop", MAX_DROP, "--log", log, "-o", tmp_path / "drop.yaml")
    assert result.exit_code == 0, result.output
    assert "latency_budget_ms" not in plain(result.output)


def test_a_log_from_other_conditions_is_not_reused(there, tmp_path, monkeypatch):
    log = Path(shutil.copy("profiles/cpu-tuned.log.jsonl", tmp_path / "other.log.jsonl"))
    result = invoke("tune", *TUNE, "--max-drop", MAX_DROP, "--images", IMAGES - 1, "--log", log)
    assert result.exit_code == 2
    output = plain(result.output)
    assert "under other conditions (they differ in: files_sha256, images)" in output and "--fresh" in output

    def measuring(*_args, **_kwargs):
        raise UserError("measuring from scratch")

    monkeypatch.setattr(tune.Device, "dense", measuring)
    result = invoke("tune", *TUNE, "--max-drop", MAX_DROP, "--images", IMAGES - 1, "--log", log, "--fresh")
    assert "measuring from scratch" in result.output
    records = read_log(log)
    assert len(records) == 1 and records[0]["conditions"]["images"] == IMAGES - 1


# --------------------------------------------------------------------------- user errors




@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "cpu", "--data", "data"], "tune needs an objective: --max-drop POINTS"),
        (["--profile", "cpu", "--data", "data", "--max-drop", "1", "--latency-ms", "5"], "one objective, not both"),
        (["--profile", "cpu", "--data", "data", "--max-drop", "-1"], "--max-drop must be a number of points >= 0"),
        (["--data", "data", "--max-drop", "1"], "tune needs a device profile: --profile NAME"),
        (["--profile", "cpu", "--max-drop", "1"], "tune needs images to measure accuracy on: --data DIR"),
        (["--profile", "cpu", "--data", "missing", "--max-drop", "1"], "data folder missing does not exist"),
        (["--profile", "cpu", "--data", "empty", "--max-drop", "1"], "data folder empty is empty"),
        (["--profile", "cpu", "--data", "data", "--max-drop", "1", "-o", "x.yml"], "must be a .yaml file"),
        (["--profile", "cpu", "--data", "data", "--max-drop", "1", "--backend", "tflite"], "unknown --backend"),
    ],
)
def test_user_errors_come_before_any_measurement(exported, no_measuring, args, message):
    Path("empty").mkdir()
    (Path("data") / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(Path("data") / "cat" / "a.png")
    result = invoke("tune", exported, *args)
    assert result.exit_code == 2
    assert message in plain(result.output)
    assert "Traceback" not in result.output


def test_a_backend_missing_here_is_refused_naming_the_override(exported, no_measuring):
    result = invoke("tune", exported, "--profile", "jetson", "--data", "data", "--max-drop", "1")
    assert result.exit_code == 3
    output = plain(result.output)
    assert "profile 'jetson' runs on tensorrt" in output and "--backend onnxruntime" in output


def test_a_static_export_is_refused(here, no_measuring, tiny_ats_onnx):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])],
        "static",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 224, 224])],
    )
    model = helper.make_model(graph)
    static = dataclasses.replace(
        read(tiny_ats_onnx), stages=(3, 4), dynamic=False, batch=1, keep=(0.7, 0.7), budget=(138, 138)
    )
    helper.set_model_props(model, static.to_metadata())
    onnx.save(model, "static.onnx")
    result = invoke("tune", "static.onnx", "--profile", "cpu", "--data", "data", "--max-drop", "1")
    assert result.exit_code == 2
    output = plain(result.output)
    assert "static.onnx is a static export" in output and "--dynamic" in output


# --------------------------------------------------------------------------- pure parts


def test_pareto_front_on_hand_made_points():
    points = [(5.0, 80.0), (3.0, 70.0), (4.0, 70.0), (3.0, 70.0), (6.0, 79.0), (1.0, 50.0), (5.0, 75.0)]
    # (4, 70) is dominated by (3, 70); (6, 79) and (5, 75) by (5, 80); the duplicates (3, 70) both stay.
    assert pareto_front(points) == [5, 1, 3, 0]
    assert pareto_front([]) == []
    assert pareto_front([(2.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]) == [0, 1, 2]
    assert pareto_front([(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]) == [0]


def test_paired_difference_and_its_standard_error():
    a = np.array([1, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0], dtype=bool)
    diff, se = tune.paired_difference(a, b)  # per image: 0, 1, 0, 1 -> mean 0.5, std 0.57735, SE 0.288675
    assert diff == pytest.approx(50.0)
    assert se == pytest.approx(100 * np.sqrt(1 / 3) / 2)
    assert tune.paired_difference(a, a) == (0.0, 0.0)
    assert not tune.told_apart(0.0, 0.0) and not tune.told_apart(50.0, 28.9) and tune.told_apart(50.0, 20.0)
    assert np.isnan(tune.paired_difference(a[:1], b[:1])[1])


def fake(keep: tuple[float, ...], accuracy: float, p50: float) -> Measurement:
    correct = np.array([True] * round(100 * accuracy) + [False] * (100 - round(100 * accuracy)))
    return Measurement(keep, correct, gflops=sum(keep), p50_ms=p50, dense_p50_ms=10.0, tokens=[197 * k for k in keep],
                       speedup=10.0 / p50)


def test_the_search_refines_stage_by_stage_within_its_bound():
    # Faster with fewer tokens; stage 0 must keep 0.7 for full accuracy, the others 0.5.
    def measure(keep):
        calls.append(keep)
        ok = keep[0] >= 0.7 - 1e-9 and min(keep[1:]) >= 0.5 - 1e-9
        return fake(keep, 1.0 if ok else 0.9, p50=sum(keep))

    calls: list[tuple[float, ...]] = []
    objective = Objective(max_drop=5.0, latency_ms=None, dense_accuracy=1.0)
    best = search.coordinate_search(measure, objective.rank, 3)
    # Coarse: 0.7 for all; each round lowers stages 1 and 2 by one step (0.05) while stage 0 stays.
    assert best.keep == (0.7, 0.55, 0.55)
    assert len(calls) <= search.evaluations_bound(3)
    assert calls[: len(search.COARSE)] == [(v,) * 3 for v in search.COARSE]


def test_the_search_never_moves_to_a_neighbour_that_keeps_the_same_tokens():
    # Stage 1 cannot keep more tokens than stage 0 passes on; timing noise makes a larger keep there look faster.
    def measure(keep):
        tokens = [197 * keep[0], 197 * min(keep)]
        p50 = sum(tokens) - keep[1]
        return Measurement(keep, np.ones(4, dtype=bool), gflops=sum(tokens), p50_ms=p50, dense_p50_ms=1000.0,
                           tokens=tokens, speedup=1000.0 / p50)

    objective = Objective(max_drop=1.0, latency_ms=None, dense_accuracy=1.0)
    # From 0.3 everywhere, each round lowers stage 0 one step; stage 1's neighbours compute the same as it does.
    assert search.coordinate_search(measure, objective.rank, 2).keep == (0.15, 0.3)


def test_objectives_rank_feasible_settings_first():
    drop = Objective(max_drop=2.0, latency_ms=None, dense_accuracy=0.8)
    slow_ok, fast_bad = fake((1.0,), 0.79, p50=9.0), fake((0.3,), 0.70, p50=3.0)
    assert drop.meets(slow_ok) and not drop.meets(fast_bad)
    assert min([fast_bad, slow_ok], key=drop.rank) is slow_ok
    budget = Objective(max_drop=None, latency_ms=5.0, dense_accuracy=0.8)
    assert min([fast_bad, slow_ok], key=budget.rank) is fast_bad
    closer = fake((0.5,), 0.75, p50=6.0)
    assert min([slow_ok, closer], key=budget.rank) is closer  # neither meets 5 ms: the nearer one wins


def test_a_setting_keeps_its_paired_speedup_and_older_logs_fall_back():
    """The speedup is measured round by round; a log line written before that had only the two medians."""
    setting = Measurement((0.5,), np.array([True]), gflops=1.0, p50_ms=2.0, dense_p50_ms=3.0, tokens=[], speedup=1.4)
    record = setting.to_record(197, 1)
    assert Measurement.from_record(record).speedup == 1.4
    del record["speedup"]
    assert Measurement.from_record(record).speedup == 1.5
    assert record["failures"] is None  # not compared (made up here)
    del record["failures"]  # logs written before tune compared with the reference
    assert Measurement.from_record(record).failures is None
    record["keep"] = [0.0]
    with pytest.raises(UserError):  # a damaged keep is refused like any bad value, so the log names the record
        Measurement.from_record(record)


def test_an_unfinished_last_log_line_is_dropped(tmp_path):
    header = {"kind": "header", "version": LOG_VERSION, "conditions": {"images": 2}}
    dense = {"kind": "dense", "correct": "10", "gflops": 1.0, "skipped": []}
    path = tmp_path / "tune.log.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(dense) + "\n" + '{"kind": "setting", "ke')
    log = Log.open(path, header, n0=197, prefix=1, fresh=False)
    assert log.dense is not None and log.dense.accuracy == 0.5 and not log.settings
    assert path.read_text().endswith("}\n") and len(read_log(path)) == 2
    log.add(Measurement((0.5, 0.5), np.array([True, True]), gflops=1.0, p50_ms=2.0, dense_p50_ms=3.0, tokens=[],
                        speedup=1.4))
    assert len(read_log(path)) == 3
    assert Log.open(path, header, n0=197, prefix=1, fresh=False).settings.keys() == {(99, 99)}


def test_tune_hands_bench_every_input_it_was_given():
    """Tune's request is bench's inputs plus its own fields: each input reaches the bench request of every precision."""
    from ats_deploy.bench import run

    given = {f.name: f"given {f.name}" for f in dataclasses.fields(run.Inputs)}
    request = tune.Request(**given, profile="cpu", backend="onnxruntime", precisions=("fp32", "int8"))
    bench = tune._bench_request(request, "int8", several=True)
    assert {name: getattr(bench, name) for name in given} == given
    assert (bench.profile, bench.backends, bench.precisions, bench.reserve_calibration) == (
        "cpu", ["onnxruntime"], ["int8"], True)
