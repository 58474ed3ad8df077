"""A Triton Inference Server model repository for an exported ATS model.

``<repository>/<name>/config.pbtxt`` beside ``1/model.onnx`` (Triton's onnxruntime backend)
or ``1/model.plan`` (its TensorRT backend); ``ats-deploy serve`` runs either file in Triton's Python backend
(:mod:`.python_model`). Each of the three is a :class:`TritonBackend`, whose entry says what its config does
differently; the rest (the ATS interface, batching) is built once. The config is built as Triton's own
``ModelConfig`` protobuf (the schema tritonclient ships) and written in protobuf's text
format, so a field name or value the schema lacks fails here rather than when the server
starts. Batching and instances come from the device profile (its ``serving`` section).

``keep`` is a required input of the native backends: Triton only leaves out an input marked
``optional`` for backends that handle its absence, and onnxruntime refuses to run a graph without
a value for each of its inputs; the exported graph has no default for ``keep``. The Python
backend's model does handle it: a request without keep gets the profile's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .. import artifact as artifacts
from .. import backends
from ..atomic import write_folder
from ..errors import UserError
from ..profiles import Profile, Serving

VERSION = "1"  # the model version folder Triton serves
CONFIG = "config.pbtxt"
# Model names are folder names and URL path segments (/v2/models/NAME): letters, digits, '_', '.', '-'.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_BAD_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]")
_EXPORT = "`ats-deploy export CHECKPOINT --dynamic`"
_REBUILD = "`ats-deploy build MODEL.onnx --profile NAME`"


@dataclass(frozen=True)
class TritonBackend:
    """One Triton backend and what its model config says differently (one config type per backend, as Triton Model
    Navigator has); :func:`build_config` writes what they share."""

    name: str  # the config's ``platform`` (a native backend) or ``backend`` (a custom one, ``python``)
    native: bool  # Triton's own backend for the file, named by ``platform``; else ``backend`` names it
    keep_optional: bool  # a request may leave keep out: the model runs its default (a native runtime needs a value)
    instances_on_cpu: bool  # Triton places the instances on the CPU whatever the profile (the model picks its device)
    threads_parameter: str | None = None  # where the profile's CPU threads go, for a backend that takes them


ONNXRUNTIME = TritonBackend("onnxruntime_onnx", native=True, keep_optional=False, instances_on_cpu=False,
                            threads_parameter="intra_op_thread_count")
TENSORRT = TritonBackend("tensorrt_plan", native=True, keep_optional=False, instances_on_cpu=False)
PYTHON = TritonBackend("python", native=False, keep_optional=True, instances_on_cpu=True)


@dataclass(frozen=True)
class Source:
    """The exported file to serve, what its metadata says, and how Triton runs it."""

    path: Path
    artifact: artifacts.Artifact
    backend: TritonBackend  # Triton's own backend for the file: onnxruntime or TensorRT
    filename: str  # the name that backend loads from the version folder
    engine_batch: tuple[int, int, int] | None = None  # an engine's optimization profile: min, opt, max batch
    tensorrt_version: str | None = None  # an engine's: only a server with this TensorRT can load it

    @property
    def is_engine(self) -> bool:
        return self.engine_batch is not None


@dataclass(frozen=True)
class Repository:
    """What :func:`write` wrote: the model folder and its config."""

    folder: Path
    config: mc.ModelConfig
    source: Source

    @property
    def on_gpu(self) -> bool:
        """Whether the instances run on a GPU (the server then needs one: ``docker run --gpus``)."""
        return any(group.kind == mc.ModelInstanceGroup.KIND_GPU for group in self.config.instance_group)


def default_name(path: Path) -> str:
    """The file's stem with the characters Triton's model names cannot hold replaced by ``_``."""
    return _BAD_NAME_CHARACTERS.sub("_", path.stem).lstrip(".") or "model"


def check_name(name: str) -> str:
    """``name`` if Triton (and a folder, and a URL) can use it as a model name."""
    if not _NAME.fullmatch(name):
        raise UserError(
            f"'{name}' cannot be a Triton model name: use letters, digits, '_', '.' and '-', not starting with '.'.",
            hint=f"For example --name {default_name(Path(name + '.onnx'))}.",
        )
    return name


def open_source(path: Path, allow_failed: bool = False) -> Source:
    """The exported ONNX file or TensorRT engine at ``path``, refused when Triton could not serve it as exported.

    A file marked as having failed validation (or an engine built from one) is refused unless ``allow_failed``.
    """
    if not path.is_file():
        raise UserError(f"{path} not found.", hint=f"Export a model with {_EXPORT}, or build an engine: {_REBUILD}.")
    suffix = path.suffix.lower()
    if suffix in artifacts.ENGINE_SUFFIXES:
        artifact, info = artifacts.read_engine(path)
        source = Source(path, artifact, TENSORRT, "model.plan", _engine_batch(info, path),
                        info.get("tensorrt_version"))
    elif suffix == ".onnx":
        source = Source(path, artifacts.read(path), ONNXRUNTIME, "model.onnx")
    else:
        raise UserError(f"{path} is neither an ONNX file (.onnx) nor a TensorRT engine (.plan, .engine).",
                        hint=f"Serve the file {_EXPORT} wrote, or an engine from {_REBUILD}.")
    _check_servable(source)
    artifacts.refuse_failed(source.artifact, path, allow_failed)
    return source


def _engine_batch(info: dict, engine: Path) -> tuple[int, int, int]:
    """The batch range the engine was built for, as ``ats-deploy build`` records it in ``<engine>.json``."""
    batch = info.get("batch")
    if not (isinstance(batch, list) and len(batch) == 3 and all(type(size) is int for size in batch)):
        raise UserError(
            f"{engine}.json records no batch range [min, opt, max] ({batch!r}), which Triton's max_batch_size must "
            "fit in.",
            hint=f"Rebuild the engine with {_REBUILD}.",
        )
    return batch[0], batch[1], batch[2]


def _check_servable(source: Source) -> None:
    artifact = source.artifact
    if artifact.ats_op != artifacts.SUBGRAPH:
        raise UserError(
            f"{source.path} holds ats-deploy's {artifact.ats_op} ATS op, whose kernel (onnxruntime) and plugin "
            "(TensorRT) are Python: Triton's onnxruntime and TensorRT backends cannot load them.",
            hint=f"Export with the default --ats-op subgraph: {_EXPORT}.",
        )
    if not artifact.stages:
        raise UserError(
            f"{source.path} has no ATS stages, so its keep and tokens are [batch, 0], a shape Triton's config cannot "
            "declare (each dimension is at least 1).",
            hint="Export it with ATS stages (--stages), or serve the dense model without ats-deploy.",
        )


def on_gpu(source: Source, profile: Profile) -> bool:
    """Whether the model's instances run on a GPU: an engine always; an ONNX file where the profile's backend does."""
    backend = backends.get(profile.backend)
    if not backend.exports:
        raise UserError(
            f"profile '{profile.name}' runs the PyTorch reference ({backend.label}), which Triton does not serve.",
            hint="Use a profile for onnxruntime (cpu) or TensorRT (server-gpu).",
        )
    if source.is_engine and not backend.engines:
        raise UserError(
            f"{source.path} is a TensorRT engine, which runs on an NVIDIA GPU, but profile '{profile.name}' runs on "
            f"{backend.label}.",
            hint="Use the profile the engine was built with (server-gpu, desktop-gpu, jetson), or serve the ONNX file.",
        )
    return source.is_engine or backend.device == "gpu"


def _batching(source: Source, profile: Profile) -> Serving:
    """The profile's serving settings, refused where the engine cannot run every batch Triton may send it (1 to max)."""
    serving = profile.serving_settings()
    if source.engine_batch is None:
        return serving
    low, _, high = source.engine_batch
    largest = serving.max_batch_size
    if low > 1:
        raise UserError(
            f"engine {source.path} runs batches of {low} to {high}, but Triton also sends smaller ones (from 1).",
            hint=f"Rebuild it with a profile whose shapes.min is 1: {_REBUILD}.",
        )
    if largest > high:
        raise UserError(
            f"profile '{profile.name}' serves batches of up to {largest} (serving.max_batch_size), but engine "
            f"{source.path} was built for batches of at most {high}.",
            hint=f"Rebuild the engine with a profile whose shapes.max is at least {largest} ({_REBUILD}), or set "
            f"serving.max_batch_size to at most {high} in profile '{profile.name}'.",
        )
    return serving


def build_config(source: Source, profile: Profile, name: str, backend: TritonBackend | None = None) -> mc.ModelConfig:
    """Triton's model config for ``source`` served with ``profile`` (docs/ATS.md section 4, batch dimension implicit)
    by ``backend``: the file's own (``source.backend``) unless another is given (:data:`PYTHON` for ``serve``).

    A static export's batch is fixed, so Triton could not send it smaller batches: it gets
    ``max_batch_size: 0`` (no server-side batching) and full shapes, and every request carries that many images.
    """
    backend = backend or source.backend
    artifact = source.artifact
    stages = len(artifact.stages)
    gpu = on_gpu(source, profile) and not backend.instances_on_cpu
    config = mc.ModelConfig(name=name, **{"platform" if backend.native else "backend": backend.name})
    if artifact.dynamic:
        serving = _batching(source, profile)
        config.max_batch_size = serving.max_batch_size
        config.dynamic_batching.preferred_batch_size.extend(serving.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
        _queue_policy(config.dynamic_batching.default_queue_policy, serving)
        batch: list = []
    else:
        batch = [artifact.batch]
    config.input.add(name="images", data_type=mc.TYPE_FP32, dims=[*batch, *artifact.input_size])
    if artifact.dynamic:
        config.input.add(name="keep", data_type=mc.TYPE_FP32, dims=[stages], optional=backend.keep_optional)
    config.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[*batch, artifact.num_classes])
    config.output.add(name="tokens", data_type=mc.TYPE_INT64, dims=[*batch, stages])
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=profile.serving_settings().instances, kind=kind)
    for key, value in artifact.to_metadata().items():  # readable back with Artifact.from_metadata
        config.parameters[key].string_value = value
    if not gpu and profile.threads is not None and backend.threads_parameter:
        config.parameters[backend.threads_parameter].string_value = str(profile.threads)
    return config


def _queue_policy(policy: mc.ModelQueuePolicy, serving: Serving) -> None:
    """Bound the batcher's queue and how long a request may wait in it (profile keys serving.max_queue_size and
    serving.queue_timeout_ms); Triton refuses a request past either at once with UNAVAILABLE (HTTP 503).

    Without a bound, a client that gives up leaves its request queued and run for nobody, and an overload grows
    the server's memory without limit.
    """
    policy.max_queue_size = serving.max_queue_size
    if serving.queue_timeout_ms:
        policy.default_timeout_microseconds = serving.queue_timeout_ms * 1000
        policy.timeout_action = mc.ModelQueuePolicy.REJECT


def render(config: mc.ModelConfig) -> str:
    """``config.pbtxt``: the config in protobuf's text format, which Triton reads."""
    return text_format.MessageToString(config)


def read_config(folder: Path) -> mc.ModelConfig:
    """The config of the model in ``folder``, parsed with Triton's schema (an unknown field or value is an error)."""
    path = folder / CONFIG
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise UserError(f"cannot read {path} as a Triton model config: {exc}") from None


def write(
    model: Path, profile: Profile, repository: Path, name: str | None = None, allow_failed: bool = False
) -> Repository:
    """Write ``<repository>/<name>/`` for ``model`` served with ``profile``; an existing model folder is refused."""
    return commit(plan(model, profile, repository, name, allow_failed))


def plan(
    model: Path, profile: Profile, repository: Path, name: str | None = None, allow_failed: bool = False
) -> Repository:
    """What :func:`write` writes, every check done and nothing written (so that more can be checked first)."""
    source = open_source(Path(model), allow_failed)
    name = default_name(source.path) if name is None else check_name(name)
    config = build_config(source, profile, name)
    folder = Path(repository) / name
    if folder.exists():
        raise UserError(
            f"{folder} already exists: a model repository holds one folder per model name.",
            hint="Choose another name with --name, or remove that folder first (Triton unloads a model whose folder "
            "is removed when it polls the repository).",
        )
    return Repository(folder, config, source)


def commit(planned: Repository) -> Repository:
    """Write the model folder :func:`plan` planned."""
    try:
        # Built beside its place and renamed in: a server polling the repository never loads half a model (Triton
        # lists hidden folders too, so one polling meanwhile logs one failed poll of the staging folder).
        source = planned.source
        write_folder(planned.folder, {CONFIG: render(planned.config)}, {f"{VERSION}/{source.filename}": source.path})
    except OSError as exc:
        raise UserError(f"cannot write the model repository {planned.folder.parent}: {exc.strerror or exc}.") from None
    return planned


def docker_command(repository: Path, gpu: bool, release: str = "<yy.mm>") -> str:
    """The ``docker run`` line that serves ``repository`` with NVIDIA's Triton container (HTTP, gRPC, metrics ports).

    ``release``: the container release; for an engine, the one whose TensorRT is the engine's (:mod:`.triton_releases`).
    """
    gpus = "--gpus all " if gpu else ""
    mount = shlex.quote(f"{Path(repository).resolve()}:/models")
    return (
        f"docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {mount} "
        f"nvcr.io/nvidia/tritonserver:{release}-py3 tritonserver --model-repository=/models"
    )
