"""Device profiles: one YAML file per deployment target (the API and the built-in YAML files).

A profile says how to build and measure a model for one target: the ATS budget
``keep`` (``docs/ATS.md`` section 2), the backend and precision, the batch size
and the batch range an engine is built for, and how long to benchmark.

Profiles are looked up by name in three places, first match wins: an existing
file path, ``./profiles/<name>.yaml`` in the current directory (so a project can
override a built-in, e.g. with the result of ``ats-deploy tune``), and the
built-in YAML files of this package.

The API lives in this package's ``__init__`` rather than in ``ats_deploy/profiles.py``:
both would be the module ``ats_deploy.profiles``, and which one Python imports depends
on how the project is installed (the package wins in a wheel, the module in an
editable install), so only one of them may exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import backends
from .. import precision as precisions
from ..atomic import write_atomic
from ..errors import UserError
from ..keep import Keep

PRECISIONS = precisions.names()  # the registry of ats_deploy.precision
LOCAL_DIR = "profiles"
SUFFIX = ".yaml"

_REQUIRED = (
    "description",
    "source",
    "backend",
    "precision",
    "keep",
    "batch",
    "shapes",
    "warmup",
    "iterations",
)
_OPTIONAL = ("threads", "static", "latency_budget_ms", "dla_core", "gpu_fallback", "serving")
_KEYS = _REQUIRED + _OPTIONAL
_SHAPE_KEYS = ("min", "opt", "max")
_SERVING_KEYS = (
    "max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "instances", "max_queue_size", "queue_timeout_ms"
)
# How long a server waits for more requests to fill a batch when the profile does not say: short
# enough not to show in a ViT's latency, long enough for concurrent requests to share a batch.
DEFAULT_QUEUE_DELAY_US = 100
# The queue bound, in batches of max_batch_size: more waiting requests are refused at once (503) instead of
# growing memory and latency without limit.
DEFAULT_QUEUE_BATCHES = 8
# How long a request may wait in the server's queue before it is refused (503); 0: no limit, the default. With
# any timeout set, Triton 2.51's dynamic batcher now and then sleeps through a wake-up (~0.5 s stalls, a few per
# thousand requests: bench/RESULTS.md, "Queue policy"), so only a profile that asks for one gets it; the queue
# bound alone already caps the work run for clients that gave up.
DEFAULT_QUEUE_TIMEOUT_MS = 0


@dataclass(frozen=True)
class Shapes:
    """The batch range an engine is built for; TensorRT tunes its kernels for ``opt``."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Serving:
    """How a server (Triton) batches requests for the model and how many copies of it run."""

    max_batch_size: int  # the largest batch the server forms
    preferred_batch_sizes: tuple[int, ...]  # batch sizes it waits for, up to max_queue_delay_us; empty: any
    max_queue_delay_us: int  # how long a request may wait for others to join its batch
    instances: int  # copies of the model running side by side on the device
    max_queue_size: int  # requests that may wait for an instance; more are refused at once (0: no bound)
    queue_timeout_ms: int  # how long a request may wait before it is refused (0: no limit)


@dataclass(frozen=True)
class Profile:
    """One deployment target. ``path`` is where it was read from (``None`` if not from a file)."""

    name: str
    description: str
    source: str
    backend: str
    precision: str
    keep: float | tuple[float, ...]
    batch: int
    shapes: Shapes
    warmup: int
    iterations: int
    threads: int | None = None
    static: bool = False
    latency_budget_ms: float | None = None  # tune's --latency-ms when no objective is given
    dla_core: int | None = None
    gpu_fallback: bool = False
    serving: Serving | None = None  # None: derived from batch and shapes (serving_settings)
    # Where a profile lives does not change what it says: two profiles read from
    # different files compare equal when their contents do.
    path: Path | None = field(default=None, compare=False)

    def keep_for(self, stages: int) -> list[float]:
        """The ``keep`` value of each of the model's ``stages`` ATS stages."""
        return Keep.parse(self.keep).per_stage(stages, owner=f"profile '{self.name}'")

    def serving_settings(self) -> Serving:
        """The ``serving`` section, or what batch and shapes imply: batches up to ``shapes.max``, preferring ``batch``.

        An engine built from the profile runs any batch up to ``shapes.max``; ``batch`` is the size it is tuned for.
        """
        return self.serving or _serving_defaults(self.batch, self.shapes)


# --------------------------------------------------------------------------- parsing


def _where(name: str, path: Path | None) -> str:
    return f"profile {path}" if path is not None else f"profile '{name}'"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `batch: true` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, float) or _is_int(value)


class _Checker:
    """Validation helpers whose messages all name the profile (file) and the key."""

    def __init__(self, name: str, path: Path | None) -> None:
        self.where = _where(name, path)

    def fail(self, key: str, problem: str) -> UserError:
        return UserError(f"{self.where}: '{key}' {problem}")

    def wrong_type(self, key: str, expected: str, value: Any) -> UserError:
        return self.fail(key, f"must be {expected}, got {_type_name(value)} {value!r}")

    def text(self, data: dict, key: str) -> str:
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.wrong_type(key, "a non-empty string", value)
        return value.strip()

    def positive_int(self, data: dict, key: str) -> int:
        value = data[key]
        if not _is_int(value):
            raise self.wrong_type(key, "an integer", value)
        if value <= 0:
            raise self.fail(key, f"must be greater than 0, got {value}")
        return value

    def optional_int(self, data: dict, key: str, minimum: int) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if not _is_int(value):
            raise self.wrong_type(key, "an integer or null", value)
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def flag(self, data: dict, key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise self.wrong_type(key, "true or false", value)
        return value

    def choice(self, data: dict, key: str, valid: tuple[str, ...]) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise self.wrong_type(key, f"one of {', '.join(valid)}", value)
        if value not in valid:
            raise self.fail(key, f"is '{value}', which is not one of: {', '.join(valid)}")
        return value

    def finite_positive(self, key: str, value: Any, expected: str) -> float:
        if not _is_number(value):
            raise self.wrong_type(key, expected, value)
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise self.fail(key, f"must be a finite number greater than 0, got {value!r}")
        return number


def _check_keys(data: dict, check: _Checker) -> None:
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(_KEYS)}"
            raise UserError(f"{check.where}: unknown key '{key}'{hint}")
    for key in _REQUIRED:
        if key not in data:
            raise UserError(f"{check.where}: missing required key '{key}'")


def _keep(data: dict, check: _Checker) -> float | tuple[float, ...]:
    value = data["keep"]
    expected = "a number or a list of numbers (one per ATS stage)"
    if isinstance(value, list):
        if not value:
            raise check.fail("keep", "must not be an empty list")
        values = tuple(check.finite_positive("keep", v, expected) for v in value)
    else:
        values = (check.finite_positive("keep", value, expected),)
    try:
        Keep(values)  # the rules every keep follows (ats_deploy.keep), e.g. no fractional absolute budget
    except UserError as err:
        raise check.fail("keep", err.message) from None
    return values if isinstance(value, list) else values[0]


def _precision(data: dict, check: _Checker) -> str:
    return check.choice(data, "precision", PRECISIONS)


def _shapes(data: dict, batch: int, check: _Checker) -> Shapes:
    value = data["shapes"]
    if not isinstance(value, dict):
        raise check.wrong_type("shapes", "a mapping {min, opt, max}", value)
    if set(value) != set(_SHAPE_KEYS):
        raise check.fail("shapes", f"must have exactly the keys min, opt and max, got {sorted(map(str, value))}")
    sizes = {key: check.positive_int(value, key) for key in _SHAPE_KEYS}
    shapes = Shapes(**sizes)
    if not shapes.min <= shapes.opt <= shapes.max:
        raise check.fail(
            "shapes", f"must satisfy min <= opt <= max, got min={shapes.min} opt={shapes.opt} max={shapes.max}"
        )
    if not shapes.min <= batch <= shapes.max:
        raise check.fail("batch", f"is {batch}, outside shapes [{shapes.min}, {shapes.max}]")
    return shapes


def _serving_defaults(batch: int, shapes: Shapes) -> Serving:
    preferred = (batch,) if batch > 1 else ()  # a preferred size of 1 would send every request alone
    return Serving(shapes.max, preferred, DEFAULT_QUEUE_DELAY_US, instances=1,
                   max_queue_size=DEFAULT_QUEUE_BATCHES * shapes.max, queue_timeout_ms=DEFAULT_QUEUE_TIMEOUT_MS)


def _serving(data: dict, batch: int, shapes: Shapes, check: _Checker) -> Serving | None:
    """The optional ``serving`` section; keys it leaves out take the defaults the batch and shapes imply."""
    value = data.get("serving")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise check.wrong_type("serving", f"a mapping with the keys {', '.join(_SERVING_KEYS)}", value)
    unknown = [str(key) for key in value if key not in _SERVING_KEYS]
    if unknown:
        raise check.fail("serving", f"has unknown key '{unknown[0]}'; valid keys: {', '.join(_SERVING_KEYS)}")
    section = {f"serving.{key}": item for key, item in value.items()}  # messages name serving.KEY
    default = _serving_defaults(batch, shapes)
    largest = check.optional_int(section, "serving.max_batch_size", 1) or default.max_batch_size
    if "preferred_batch_sizes" in value:
        preferred = _preferred(section, largest, check)
    else:
        preferred = tuple(size for size in default.preferred_batch_sizes if size <= largest)
    delay = check.optional_int(section, "serving.max_queue_delay_us", 0)
    instances = check.optional_int(section, "serving.instances", 1)
    queue = check.optional_int(section, "serving.max_queue_size", 0)
    timeout = check.optional_int(section, "serving.queue_timeout_ms", 0)
    return Serving(
        max_batch_size=largest,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=default.max_queue_delay_us if delay is None else delay,
        instances=instances or default.instances,
        max_queue_size=DEFAULT_QUEUE_BATCHES * largest if queue is None else queue,
        queue_timeout_ms=default.queue_timeout_ms if timeout is None else timeout,
    )


def _preferred(section: dict, largest: int, check: _Checker) -> tuple[int, ...]:
    key = "serving.preferred_batch_sizes"
    sizes = section[key]
    if not isinstance(sizes, list) or not all(_is_int(size) and size > 0 for size in sizes):
        raise check.wrong_type(key, "a list of batch sizes greater than 0", sizes)
    if sorted(set(sizes)) != sizes:
        raise check.fail(key, f"must be in increasing order without repeats, got {sizes}")
    if sizes and sizes[-1] > largest:
        raise check.fail(key, f"holds {sizes[-1]}, more than serving.max_batch_size {largest}")
    return tuple(sizes)


def _check_target(profile: Profile, check: _Checker) -> None:
    """Rules that tie several keys together."""
    shapes = profile.shapes
    if profile.static and not (shapes.min == shapes.opt == shapes.max == profile.batch):
        raise check.fail("static", "is true, so batch and shapes min, opt and max must all be equal")
    backend = backends.get(profile.backend)
    for key, used in (("dla_core", profile.dla_core is not None), ("gpu_fallback", profile.gpu_fallback)):
        if used and key not in backend.profile_keys:
            owners = " or ".join(b.name for b in backends.all_backends() if key in b.profile_keys)
            raise check.fail(key, f"only applies to the {owners} backend, not '{profile.backend}'")
    if profile.gpu_fallback and profile.dla_core is None:
        raise check.fail("gpu_fallback", "only applies when dla_core is set")
    if profile.dla_core is not None:
        if precisions.get(profile.precision).tensorrt_flag is None:  # the DLA builds weakly typed, by the flag
            flagged = " or ".join(name for name in PRECISIONS if precisions.get(name).tensorrt_flag)
            raise check.fail("precision", f"must be {flagged} with dla_core: the DLA runs fp16 or int8 only")
        if not profile.static:
            raise check.fail("static", "must be true with dla_core: DLA engines have static shapes")
    if profile.precision not in backend.precisions:
        runs = " or ".join(backend.precisions)
        owners = ", ".join(precisions.get(profile.precision).backends())
        raise check.fail(
            "precision",
            f"{profile.precision} is not useful on the {backend.label} backend; use {runs} "
            f"({profile.precision} runs on: {owners})",
        )


def parse_profile(data: dict, name: str, path: Path | None) -> Profile:
    """Validate the mapping read from a profile file; every message names the file and the key."""
    check = _Checker(name, path)
    if not isinstance(data, dict):
        raise UserError(f"{check.where}: must be a mapping of keys to values, got {_type_name(data)}")
    _check_keys(data, check)
    batch = check.positive_int(data, "batch")
    latency = data.get("latency_budget_ms")
    shapes = _shapes(data, batch, check)
    profile = Profile(
        name=name,
        path=path,
        description=check.text(data, "description"),
        source=check.text(data, "source"),
        backend=check.choice(data, "backend", backends.names()),
        precision=_precision(data, check),
        keep=_keep(data, check),
        batch=batch,
        shapes=shapes,
        warmup=check.positive_int(data, "warmup"),
        iterations=check.positive_int(data, "iterations"),
        threads=check.optional_int(data, "threads", 1),
        static=check.flag(data, "static"),
        latency_budget_ms=None
        if latency is None
        else check.finite_positive("latency_budget_ms", latency, "a number of milliseconds"),
        dla_core=check.optional_int(data, "dla_core", 0),
        gpu_fallback=check.flag(data, "gpu_fallback"),
        serving=_serving(data, batch, shapes, check),
    )
    _check_target(profile, check)
    return profile


def _read(text: str, name: str, path: Path | None) -> Profile:
    where = _where(name, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: invalid YAML{line}: {problem}") from None
    if data is None:
        raise UserError(f"{where}: the file is empty; a profile needs the keys {', '.join(_REQUIRED)}")
    return parse_profile(data, name, path)


def _read_file(path: Path) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    return _read(text, path.stem, path)


# --------------------------------------------------------------------------- lookup


def _builtin_dir():
    return resources.files(__name__)


def _builtin_names() -> list[str]:
    return sorted(entry.name[: -len(SUFFIX)] for entry in _builtin_dir().iterdir() if entry.name.endswith(SUFFIX))


def _read_builtin(name: str) -> Profile:
    entry = _builtin_dir() / f"{name}{SUFFIX}"
    # An installed package is a real directory; a zipped one has no file path to report.
    path = Path(str(entry)) if Path(str(entry)).is_file() else None
    return _read(entry.read_text(encoding="utf-8"), name, path)


def load_profile(name_or_path: str) -> Profile:
    """A profile by file path, by name in ``./profiles/``, or by built-in name, in that order."""
    given = Path(name_or_path)
    if given.is_file():
        return _read_file(given)
    local = Path.cwd() / LOCAL_DIR / f"{name_or_path}{SUFFIX}"
    if local.is_file():
        return _read_file(local)
    if name_or_path in _builtin_names():
        return _read_builtin(name_or_path)
    builtins = _builtin_names()
    close = difflib.get_close_matches(name_or_path, builtins, n=1)
    suggestion = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown profile '{name_or_path}'.{suggestion}",
        hint=f"Built-in profiles: {', '.join(builtins)}. Looked for a file at {given}, at {local}, "
        f"and among the built-ins in {_builtin_dir()}.",
    )


def list_profiles() -> list[Profile]:
    """Built-in profiles plus ``./profiles/*.yaml``; a local file overrides the built-in of its name.

    The first local file that cannot be read raises its :class:`UserError` (:func:`scan_profiles` lists around it).
    """
    profiles, problems = scan_profiles()
    if problems:
        raise problems[0]
    return profiles


def scan_profiles() -> tuple[list[Profile], list[UserError]]:
    """:func:`list_profiles` without the local files that cannot be read, and their problems.

    One bad file does not hide every good profile; a built-in it overrides is left out too, since
    ``--profile NAME`` reads the bad file.
    """
    found = {name: _read_builtin(name) for name in _builtin_names()}
    problems: list[UserError] = []
    local_dir = Path.cwd() / LOCAL_DIR
    if local_dir.is_dir():
        for path in sorted(local_dir.glob(f"*{SUFFIX}")):
            try:
                found[path.stem] = _read_file(path)
            except UserError as err:
                hidden = found.pop(path.stem, None)
                overrides = f" (it overrides the built-in '{hidden.name}', which is not listed)" if hidden else ""
                problems.append(UserError(f"{err.message.rstrip('.')}{overrides}; fix or remove the file."))
    return [found[name] for name in sorted(found)], problems


# --------------------------------------------------------------------------- writing


def _as_data(profile: Profile) -> dict[str, Any]:
    keep = list(profile.keep) if isinstance(profile.keep, tuple) else profile.keep
    data: dict[str, Any] = {
        "description": profile.description,
        "source": profile.source,
        "backend": profile.backend,
        "precision": profile.precision,
        "keep": keep,
        "batch": profile.batch,
        "shapes": {"min": profile.shapes.min, "opt": profile.shapes.opt, "max": profile.shapes.max},
        "threads": profile.threads,
        "warmup": profile.warmup,
        "iterations": profile.iterations,
        "static": profile.static,
    }
    optional = {
        "latency_budget_ms": profile.latency_budget_ms,
        "dla_core": profile.dla_core,
        "gpu_fallback": profile.gpu_fallback or None,
    }
    data.update({key: value for key, value in optional.items() if value is not None})
    if profile.serving is not None:
        serving = dataclasses.asdict(profile.serving)  # keeps the tuple, which safe_dump cannot write
        data["serving"] = {**serving, "preferred_batch_sizes": list(profile.serving.preferred_batch_sizes)}
    return data


def dump_profile(profile: Profile, path: Path, header_comments: list[str]) -> None:
    """Write ``profile`` as YAML, preceded by ``header_comments`` as ``#`` lines.

    ``load_profile(path)`` reads back an equal profile (its name is the file's stem).
    """
    comments = [f"# {line}".rstrip() for text in header_comments for line in text.splitlines() or [""]]
    body = yaml.safe_dump(_as_data(profile), sort_keys=False, default_flow_style=None, allow_unicode=True)
    text = "\n".join([*comments, body]) if comments else body
    write_atomic(Path(path), text.encode("utf-8"))
