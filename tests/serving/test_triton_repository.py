"""``ats-deploy triton``: a Triton model repository that Triton's own config schema reads back as the profile says.

Engines are stand-ins (bytes plus the ``<engine>.json`` ``ats-deploy build`` writes): the
repository is built from the metadata, which the sidecar holds, and no TensorRT runs here.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import onnx
import pytest
from cli_helpers import invoke, plain
from tritonclient.grpc import model_config_pb2 as mc

from ats_deploy.artifact import SIDECAR_KEY, Artifact, engine_info_path, read
from ats_deploy.errors import UserError
from ats_deploy.profiles import dump_profile, load_profile, parse_profile
from ats_deploy.serving.repository import default_name, read_config, write
from ats_deploy.serving.server import bundled_triton

GPU = mc.ModelInstanceGroup.KIND_GPU
CPU = mc.ModelInstanceGroup.KIND_CPU


def with_metadata(source: Path, path: Path, changes: dict[str, str]) -> Path:
    """A copy of ``source`` whose metadata has ``changes`` set (replaced or added)."""
    model = onnx.load(str(source), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def static_copy(source: Path, path: Path, batch: int = 2) -> Path:
    """``source``'s metadata as a static export for ``batch`` says it (no keep input, that batch only)."""
    budget = json.dumps([118] * len(read(source).stages))
    return with_metadata(source, path, {"dynamic": "false", "batch": str(batch), "budget": budget})


def fake_engine(folder: Path, onnx_path: Path, batch: list[int]) -> Path:
    """An engine file and the ``<engine>.json`` ``ats-deploy build`` writes beside it, for the batch range ``batch``."""
    engine = folder / "deit.server-gpu.plan"
    engine.write_bytes(b"a serialized TensorRT engine")
    info = {SIDECAR_KEY: read(onnx_path).to_metadata(), "tensorrt_version": "10.8.0.43", "batch": batch}
    engine_info_path(engine).write_text(json.dumps(info))
    return engine


def dims(config: mc.ModelConfig) -> dict[str, tuple[str, list[int]]]:
    tensors = [*config.input, *config.output]
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors}


def metadata(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_a_cpu_repository_reads_back_with_tritons_schema(tiny_ats_onnx, tmp_path):
    profile = load_profile("cpu")
    written = write(tiny_ats_onnx, profile, tmp_path / "repo", "deit")
    config = read_config(tmp_path / "repo" / "deit")
    assert config == written.config
    assert config.name == "deit" and config.platform == "onnxruntime_onnx"
    assert (tmp_path / "repo/deit/1/model.onnx").read_bytes() == tiny_ats_onnx.read_bytes()
    artifact = read(tiny_ats_onnx)
    stages = len(artifact.stages)
    assert dims(config) == {
        "images": ("TYPE_FP32", [3, 224, 224]),
        "keep": ("TYPE_FP32", [stages]),  # one row per image: the batch dimension is Triton's
        "logits": ("TYPE_FP32", [artifact.num_classes]),
        "tokens": ("TYPE_INT64", [stages]),
    }
    assert not any(tensor.optional for tensor in config.input)
    graph = onnx.load(str(tiny_ats_onnx), load_external_data=False).graph
    for tensor in [*graph.input, *graph.output]:  # what the onnxruntime backend checks the config against
        shape = [d.dim_value or -1 for d in tensor.type.tensor_type.shape.dim]
        assert shape == [-1, *dims(config)[tensor.name][1]], tensor.name
    serving = profile.serving_settings()
    assert config.max_batch_size == serving.max_batch_size
    assert list(config.dynamic_batching.preferred_batch_size) == list(serving.preferred_batch_sizes)
    assert config.dynamic_batching.max_queue_delay_microseconds == serving.max_queue_delay_us
    assert [(g.kind, g.count) for g in config.instance_group] == [(CPU, serving.instances)]
    params = metadata(config)
    assert params.pop("intra_op_thread_count") == str(profile.threads)
    assert Artifact.from_metadata(params, "the served model") == artifact  # a client can read the model back
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["deit"]  # no staging folder left behind


def test_server_gpu_serves_the_onnx_file_and_the_engine_on_the_gpu(tiny_ats_onnx, tmp_path):
    profile = load_profile("server-gpu")
    serving = profile.serving_settings()
    engine = fake_engine(tmp_path, tiny_ats_onnx, [1, 32, 64])
    from_onnx = write(tiny_ats_onnx, profile, tmp_path / "repo", "deit_onnx").config
    from_engine = write(engine, profile, tmp_path / "repo").config
    assert from_onnx.platform == "onnxruntime_onnx" and from_engine.platform == "tensorrt_plan"
    assert from_engine.name == "deit.server-gpu"
    assert (tmp_path / "repo/deit.server-gpu/1/model.plan").read_bytes() == engine.read_bytes()
    for config in (from_onnx, from_engine):
        assert config.max_batch_size == serving.max_batch_size == 64
        assert list(config.dynamic_batching.preferred_batch_size) == list(serving.preferred_batch_sizes)
        assert [(g.kind, g.count) for g in config.instance_group] == [(GPU, serving.instances)]
        assert "intra_op_thread_count" not in config.parameters
    assert dims(from_onnx) == dims(from_engine)


def test_each_triton_backend_writes_its_own_config_of_the_same_interface(tiny_ats_onnx, tmp_path):
    """The Python backend's config (``serve``'s) beside the file's own: named by ``backend`` instead of ``platform``,
    keep optional, instances on the CPU for Triton even for an engine on a GPU profile, no onnxruntime threads."""
    from ats_deploy.serving.repository import ONNXRUNTIME, PYTHON, TENSORRT, build_config, open_source

    engine = open_source(fake_engine(tmp_path, tiny_ats_onnx, [1, 32, 64]))
    for source, profile, native in ((open_source(tiny_ats_onnx), load_profile("cpu"), ONNXRUNTIME),
                                    (engine, load_profile("server-gpu"), TENSORRT)):
        assert source.backend is native
        own, python = build_config(source, profile, "m"), build_config(source, profile, "m", PYTHON)
        assert (own.platform, own.backend, python.platform, python.backend) == (native.name, "", "", "python")
        assert [t.optional for t in own.input] == [False, False] and [t.optional for t in python.input] == [False, True]
        assert [g.kind for g in python.instance_group] == [CPU] and own.instance_group[0].kind == (
            GPU if native is TENSORRT else CPU)
        assert "intra_op_thread_count" not in python.parameters
        assert dims(python) == dims(own) and python.dynamic_batching == own.dynamic_batching
        assert metadata(python) == {k: v for k, v in metadata(own).items() if k != "intra_op_thread_count"}


def test_an_engine_built_for_smaller_batches_than_the_profile_serves_is_refused(tiny_ats_onnx, tmp_path):
    profile = load_profile("server-gpu")
    engine = fake_engine(tmp_path, tiny_ats_onnx, [1, 8, 32])
    with pytest.raises(UserError, match=r"batches of up to 64 .*at most 32") as caught:
        write(engine, profile, tmp_path / "repo")
    assert "shapes.max is at least 64" in caught.value.hint and "serving.max_batch_size" in caught.value.hint
    assert not (tmp_path / "repo").exists()
    smaller = dataclasses.replace(profile, serving=dataclasses.replace(profile.serving, max_batch_size=32))
    assert write(engine, smaller, tmp_path / "repo").config.max_batch_size == 32
    fake_engine(tmp_path, tiny_ats_onnx, [2, 8, 64])
    with pytest.raises(UserError, match=r"runs batches of 2 to 64"):
        write(engine, profile, tmp_path / "repo", "min2")
    with pytest.raises(UserError, match=r"TensorRT engine, which runs on an NVIDIA GPU"):
        write(engine, load_profile("cpu"), tmp_path / "repo", "on_cpu")


def test_a_static_export_is_served_whole_batches_without_keep(tiny_ats_onnx, tmp_path):
    stages = len(read(tiny_ats_onnx).stages)
    static = static_copy(tiny_ats_onnx, tmp_path / "static.onnx")
    config = write(static, load_profile("server-gpu"), tmp_path / "repo").config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")  # the batch is the file's
    assert dims(config) == {
        "images": ("TYPE_FP32", [2, 3, 224, 224]),
        "logits": ("TYPE_FP32", [2, 1000]),
        "tokens": ("TYPE_INT64", [2, stages]),
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"interface_version": "1"}, r"interface version 1"),
        ({"ats_op": "custom"}, r"custom ATS op.*cannot load"),
        ({"stages": "[]", "keep": "[]"}, r"no ATS stages"),
    ],
)
def test_files_triton_cannot_serve_as_exported_are_refused(tiny_ats_onnx, tmp_path, changes, message):
    model = with_metadata(tiny_ats_onnx, tmp_path / "model.onnx", changes)
    with pytest.raises(UserError, match=message) as caught:
        write(model, load_profile("cpu"), tmp_path / "repo")
    assert "--dynamic" in str(caught.value) or "--stages" in str(caught.value)  # the hint names the re-export
    assert not (tmp_path / "repo" / "model").exists()


def test_an_existing_model_folder_is_never_overwritten(tiny_ats_onnx, tmp_path):
    write(tiny_ats_onnx, load_profile("cpu"), tmp_path, "deit")
    before = (tmp_path / "deit/config.pbtxt").read_text()
    with pytest.raises(UserError, match=r"deit already exists") as caught:
        write(tiny_ats_onnx, load_profile("server-gpu"), tmp_path, "deit")
    assert "--name" in caught.value.hint
    assert (tmp_path / "deit/config.pbtxt").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit"]


def test_a_missing_foreign_or_unwritable_path_is_one_clear_error(tiny_ats_onnx, tmp_path, read_only_dir):
    profile = load_profile("cpu")
    with pytest.raises(UserError, match=r"missing\.onnx not found"):
        write(tmp_path / "missing.onnx", profile, tmp_path)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"weights")
    with pytest.raises(UserError, match=r"neither an ONNX file"):
        write(weights, profile, tmp_path)
    with pytest.raises(UserError, match=r"cannot write the model repository"):
        write(tiny_ats_onnx, profile, read_only_dir, "deit")
    assert list(read_only_dir.iterdir()) == []


def test_names_are_what_triton_accepts():
    assert default_name(Path("runs/my model@v2.final.onnx")) == "my_model_v2.final"
    assert default_name(Path(".onnx")) == "onnx"


def test_the_cli_writes_the_repository_and_prints_how_to_serve_it(exported):
    result = invoke("triton", exported, "--profile", "cpu", "-o", "model_repository")
    assert result.exit_code == 0, result.output
    name = exported.stem
    assert read_config(Path("model_repository") / name).platform == "onnxruntime_onnx"
    text = plain(result.output)
    assert f"model_repository/{name}" in text and "batches up to 8" in text
    assert "tritonserver --model-repository=/models" in text and "--gpus" not in text  # a CPU model needs no GPU
    assert f"{Path('model_repository').resolve()}:/models" in text
    again = invoke("triton", exported, "--profile", "cpu", "-o", "model_repository")
    assert again.exit_code == 2 and "already exists" in plain(again.output) and "Traceback" not in again.output
    bad = invoke("triton", exported, "--profile", "cpu", "--name", "a/b")
    assert bad.exit_code == 2 and "cannot be a Triton model name" in plain(bad.output)
    gpu = invoke("triton", exported, "--profile", "server-gpu", "--name", "gpu")
    assert gpu.exit_code == 0 and "--gpus all" in plain(gpu.output)


# --------------------------------------------------------------------------- the profile's serving section

BASE = {
    "description": "d",
    "source": "s",
    "backend": "onnxruntime",
    "precision": "fp32",
    "keep": 0.7,
    "batch": 8,
    "shapes": {"min": 1, "opt": 8, "max": 32},
    "warmup": 1,
    "iterations": 1,
}


def test_serving_settings_default_to_the_batch_and_shapes_and_fill_a_partial_section():
    derived = parse_profile(BASE, "p", None).serving_settings()
    assert (derived.max_batch_size, derived.preferred_batch_sizes, derived.instances) == (32, (8,), 1)
    partial = parse_profile({**BASE, "serving": {"instances": 3, "max_batch_size": 4}}, "p", None).serving
    assert (partial.max_batch_size, partial.preferred_batch_sizes, partial.instances) == (4, (), 3)
    assert partial.max_queue_delay_us == derived.max_queue_delay_us


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"max_batch": 4}, r"'serving' has unknown key 'max_batch'"),
        ({"max_batch_size": 0}, r"'serving.max_batch_size' must be at least 1"),
        ({"max_batch_size": 8, "preferred_batch_sizes": [4, 16]}, r"holds 16, more than serving.max_batch_size 8"),
        ({"preferred_batch_sizes": [8, 4]}, r"'serving.preferred_batch_sizes' must be in increasing order"),
        ({"max_queue_delay_us": -1}, r"'serving.max_queue_delay_us' must be at least 0"),
        ([64], r"'serving' must be a mapping"),
    ],
)
def test_a_bad_serving_section_is_refused_naming_the_key(serving, message):
    with pytest.raises(UserError, match=message):
        parse_profile({**BASE, "serving": serving}, "p", None)


def test_a_written_profile_keeps_its_serving_section(here):
    profile = load_profile("server-gpu")
    dump_profile(profile, here / "copy.yaml", ["copy"])
    assert profile.serving is not None
    assert load_profile(str(here / "copy.yaml")).serving == profile.serving


# --------------------------------------------------------------------------- Triton itself


def test_tritonserver_accepts_the_configs(tiny_ats_onnx, tmp_path):
    """Triton validates a config when it polls the repository, before it looks for the backend.

    pytriton's server has no onnxruntime or TensorRT backend, so a model it accepts fails
    next, on "unable to find backend library"; a config it refuses fails before, naming the field.
    """
    server, environment = bundled_triton(tmp_path / "backends")
    if not server.is_file():
        pytest.skip(f"no tritonserver binary at {server} (pytriton ships one on Linux x86-64 and arm64)")
    repo = tmp_path / "repo"
    write(tiny_ats_onnx, load_profile("cpu"), repo, "cpu")
    write(fake_engine(tmp_path, tiny_ats_onnx, [1, 32, 64]), load_profile("server-gpu"), repo, "engine")
    write(static_copy(tiny_ats_onnx, tmp_path / "static.onnx"), load_profile("cpu"), repo, "static")
    bad = repo / "bad"
    bad.mkdir()  # the control: a config Triton refuses, to show the check can fail
    (bad / "config.pbtxt").write_text((repo / "cpu/config.pbtxt").read_text().replace('"cpu"', '"bad"')
                                      .replace("preferred_batch_size: 8", "preferred_batch_size: 16"))
    options = ["--allow-http=false", "--allow-grpc=false", "--allow-metrics=false", "--disable-auto-complete-config"]
    run = subprocess.run([server, f"--model-repository={repo}", f"--backend-directory={tmp_path / 'backends'}",
                          *options], capture_output=True, text=True, timeout=60, env=environment)
    log = run.stdout + run.stderr
    assert "preferred size must be <= max batch size for bad" in log
    for name, backend in (("cpu", "onnxruntime"), ("static", "onnxruntime"), ("engine", "tensorrt")):
        assert f"failed to load '{name}' version 1: Invalid argument: unable to find backend library for " \
               f"backend '{backend}'" in log, log[-3000:]
        assert f"Poll failed for model directory '{name}'" not in log


def test_the_queue_is_bounded_by_default_and_a_profile_may_add_a_timeout(tiny_ats_onnx, tmp_path):
    """serving.max_queue_size and serving.queue_timeout_ms become Triton's default queue policy (refuse with 503):
    by default 8 batches may wait and no timeout is set (Triton 2.51's batcher stalls with one); a profile sets
    its own bound and timeout."""
    policy = write(tiny_ats_onnx, load_profile("cpu"), tmp_path / "a").config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (8 * 8, 0)
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    data = {**dump_profile_data("cpu"), "serving": {"max_batch_size": 4, "max_queue_size": 5, "queue_timeout_ms": 250}}
    own = write(tiny_ats_onnx, parse_profile(data, "own", None), tmp_path / "b").config.dynamic_batching
    assert (own.default_queue_policy.max_queue_size, own.default_queue_policy.default_timeout_microseconds) == (
        5, 250_000)
    with pytest.raises(UserError, match=r"serving\.max_queue_size"):
        parse_profile({**data, "serving": {"max_queue_size": -1}}, "bad", None)


def dump_profile_data(name: str) -> dict:
    """A shipped profile as the mapping its file holds."""
    import yaml

    return yaml.safe_load((Path(load_profile(name).path)).read_text())
