"""Device profiles: the built-ins, lookup order, round trips and the messages for bad files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ats_deploy import backends
from ats_deploy.errors import UserError
from ats_deploy.profiles import (
    Profile,
    Shapes,
    dump_profile,
    list_profiles,
    load_profile,
    parse_profile,
)

BUILTINS = ["cpu", "cpu-batch", "cpu-openvino", "desktop-gpu", "jetson", "jetson-dla", "server-gpu"]

VALID = {
    "description": "a test target",
    "source": "made up for a test",
    "backend": "tensorrt",
    "precision": "fp16",
    "keep": 0.7,
    "batch": 4,
    "shapes": {"min": 1, "opt": 4, "max": 8},
    "threads": None,
    "warmup": 3,
    "iterations": 10,
    "static": False,
}


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path, monkeypatch):
    """Run every test from an empty directory, so no ./profiles/ of the checkout interferes."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def changed(**updates) -> dict:
    data = {**VALID, **updates}
    return {key: value for key, value in data.items() if value is not ...}


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.path is not None and profile.path.name == f"{name}.yaml"
    assert profile.backend in backends.names()
    assert profile.shapes.min <= profile.batch <= profile.shapes.max
    assert "ats-deploy tune" in profile.source
    assert len(profile.keep_for(9)) == 9


def test_builtin_targets():
    dla = load_profile("jetson-dla")
    assert (dla.static, dla.batch, dla.dla_core, dla.gpu_fallback, dla.precision) == (True, 1, 0, True, "fp16")
    assert load_profile("jetson").batch == 1
    assert load_profile("desktop-gpu").batch == 8
    assert load_profile("server-gpu").batch == 32
    cpu = load_profile("cpu")
    assert (cpu.backend, cpu.precision, cpu.batch) == ("onnxruntime", "fp32", 1)
    assert cpu.threads is not None
    assert load_profile("cpu-batch").batch == 8
    openvino = load_profile("cpu-openvino")
    assert (openvino.backend, openvino.precision, openvino.batch, openvino.threads) == ("openvino", "fp32", 1, 4)


def test_list_profiles_gives_the_builtins():
    assert [p.name for p in list_profiles()] == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_dump_load_round_trip_of_builtins(name, tmp_path):
    profile = load_profile(name)
    target = tmp_path / "out" / f"{name}.yaml"
    dump_profile(profile, target, ["measured on nothing", "second line"])
    assert load_profile(str(target)) == profile
    assert target.read_text().startswith("# measured on nothing\n# second line\n")


def test_round_trip_keeps_lists_and_optional_keys(tmp_path):
    data = changed(keep=[0.9, 0.8, 64], latency_budget_ms=12.5, threads=6)
    profile = parse_profile(data, "custom", None)
    assert profile.keep == (0.9, 0.8, 64.0)
    target = tmp_path / "custom.yaml"
    dump_profile(profile, target, ["tuned: keep from a sweep\nsecond paragraph"])
    loaded = load_profile(str(target))
    assert loaded == profile
    assert loaded.path == target
    assert list(tmp_path.iterdir()) == [target], "no temporary file is left behind"


def test_dump_replaces_an_existing_file(tmp_path):
    target = write(tmp_path / "jetson.yaml", "old contents")
    dump_profile(load_profile("jetson"), target, [])
    assert load_profile(str(target)) == load_profile("jetson")


def test_keep_for():
    single = parse_profile(changed(keep=0.5), "p", None)
    assert single.keep_for(3) == [0.5, 0.5, 0.5]
    per_stage = parse_profile(changed(keep=[0.9, 0.7, 0.5]), "p", None)
    assert per_stage.keep_for(3) == [0.9, 0.7, 0.5]
    assert parse_profile(changed(keep=[0.4]), "p", None).keep_for(2) == [0.4, 0.4]
    with pytest.raises(UserError, match=r"profile 'p' gives 3 keep values but the model has 9 ATS stages"):
        per_stage.keep_for(9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (changed(bach=4), r"unknown key 'bach' \(did you mean 'batch'\?\)"),
        (changed(colour="red"), r"unknown key 'colour'; valid keys: description"),
        (changed(batch="8"), r"'batch' must be an integer, got str '8'"),
        (changed(batch=True), r"'batch' must be an integer, got bool True"),
        (changed(keep="high"), r"'keep' must be a number or a list of numbers.*got str 'high'"),
        (changed(static="yes"), r"'static' must be true or false, got str 'yes'"),
        (changed(threads=2.5), r"'threads' must be an integer or null, got float 2.5"),
        (changed(shapes=[1, 4, 8]), r"'shapes' must be a mapping \{min, opt, max\}, got list"),
        (changed(backend=...), r"missing required key 'backend'"),
        (changed(source=...), r"missing required key 'source'"),
        (changed(batch=16), r"'batch' is 16, outside shapes \[1, 8\]"),
        (changed(shapes={"min": 4, "opt": 2, "max": 8}), r"'shapes' must satisfy min <= opt <= max"),
        (changed(shapes={"min": 1, "max": 8}), r"'shapes' must have exactly the keys min, opt and max"),
        (changed(iterations=-5), r"'iterations' must be greater than 0, got -5"),
        (changed(warmup=0), r"'warmup' must be greater than 0, got 0"),
        (changed(keep=0), r"'keep' must be a finite number greater than 0, got 0"),
        (changed(keep=[0.5, -1]), r"'keep' must be a finite number greater than 0, got -1"),
        (changed(keep=[]), r"'keep' must not be an empty list"),
        ("keep: .nan\n", r"'keep' must be a finite number greater than 0, got nan"),
        ("keep: .inf\n", r"'keep' must be a finite number greater than 0, got inf"),
        (changed(backend="tensorflow"), r"'backend' is 'tensorflow', which is not one of: tensorrt, onnxruntime"),
        (changed(backend="pytorch", precision="int8"), r"'precision' int8 is not useful on the PyTorch CPU backend"),
        (changed(precision="bf16"), r"'precision' is 'bf16', which is not one of: fp32, fp16"),
        (changed(latency_budget_ms=-1), r"'latency_budget_ms' must be a finite number greater than 0"),
        (changed(backend="onnxruntime", precision="fp32", dla_core=0), r"'dla_core' only applies to the tensorrt"),
        (changed(gpu_fallback=True), r"'gpu_fallback' only applies when dla_core is set"),
        (changed(dla_core=0), r"'static' must be true with dla_core"),
        (changed(static=True), r"'static' is true, so batch and shapes min, opt and max must all be equal"),
        (changed(backend="onnxruntime"), r"'precision' fp16 is not useful on the onnxruntime CPU backend"),
        ("backend: tensorrt\nbatch: [1, 2\nkeep: 0.7\n", r"invalid YAML at line 3"),
        ("", r"the file is empty; a profile needs the keys description"),
        ("# only a comment\n", r"the file is empty"),
        ("- jetson\n- cpu\n", r"must be a mapping of keys to values, got list"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    if isinstance(text, str) and text.startswith("keep: ."):
        text = yaml.safe_dump(changed(keep=None), sort_keys=False).replace("keep: null\n", text)
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError, match=message) as caught:
        load_profile(str(path))
    assert str(path) in str(caught.value)


def test_parse_profile_without_a_file_names_the_profile():
    with pytest.raises(UserError, match=r"^profile 'mine': 'batch' must be an integer"):
        parse_profile(changed(batch=1.5), "mine", None)


def test_cwd_profiles_override_builtins(tmp_path):
    local = write(tmp_path / "profiles" / "jetson.yaml", changed(batch=2, shapes={"min": 1, "opt": 2, "max": 4}))
    write(tmp_path / "profiles" / "lab.yaml", VALID)
    profile = load_profile("jetson")
    assert profile.path == local and profile.batch == 2
    listed = {p.name: p for p in list_profiles()}
    assert sorted(listed) == sorted([*BUILTINS, "lab"])
    assert listed["jetson"].path == local
    assert listed["lab"].path == tmp_path / "profiles" / "lab.yaml"
    assert listed["cpu"].path != tmp_path / "profiles" / "cpu.yaml"


def test_an_explicit_path_wins(tmp_path):
    write(tmp_path / "profiles" / "jetson.yaml", changed(batch=2, shapes={"min": 1, "opt": 2, "max": 4}))
    other = write(tmp_path / "elsewhere" / "jetson.yaml", VALID)
    assert load_profile(str(other)).batch == 4


def test_unknown_profile_lists_the_builtins_and_where_it_looked(tmp_path):
    with pytest.raises(UserError) as caught:
        load_profile("jetsn")
    text = str(caught.value)
    assert "unknown profile 'jetsn'. Did you mean 'jetson'?" in text
    for name in BUILTINS:
        assert name in text
    assert str(tmp_path / "profiles" / "jetsn.yaml") in text


def test_profiles_compare_by_contents_not_location():
    profile = load_profile("cpu")
    assert dataclasses.replace(profile, path=Path("/elsewhere/cpu.yaml")) == profile
    assert dataclasses.replace(profile, batch=2, shapes=Shapes(1, 2, 2)) != profile
    assert isinstance(profile, Profile)
