"""A Triton client for the ATS interface (docs/ATS.md section 4) over HTTP or gRPC.

The protocol comes from the URL: ``grpc://host:port`` speaks gRPC, ``host:port`` or
``http://host:port`` HTTP. :func:`connect` asks the server what it serves (input size,
keep length, classes, batch limit, the export's metadata when the model config carries it)
and turns every way that can fail into one :class:`~ats_deploy.errors.UserError`.
A :class:`Client` is one connection: each load-generating thread opens its own.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import numpy as np

from ats_deploy.errors import UserError

PROTOCOLS = {"http": 8000, "grpc": 8001}  # Triton's default ports
START_SERVER = "Start one with `ats-deploy serve MODEL --profile cpu` (it listens on localhost:8000, gRPC 8001)."
# gRPC UNAVAILABLE answers that come from a server refusing a request (Triton's queue policy, a --slo-ms front model
# over capacity or past a deadline), not from a missing server.
SERVER_REFUSALS = ("Exceeds maximum queue size", "over capacity", "dropped:", "retry shortly")
PROBE_TIMEOUT_S = 5.0  # how long the first questions to the server may take


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens and which protocol it speaks there."""

    protocol: str  # "http" or "grpc"
    address: str  # host:port

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``localhost:8000``, ``http://host:8000`` or ``grpc://host:8001``; a missing port is Triton's default."""
        scheme, found, rest = url.partition("://")
        protocol, address = (scheme.lower(), rest) if found else ("http", url)
        if protocol not in PROTOCOLS:
            raise UserError(
                f"cannot read URL '{url}': the scheme must be http:// or grpc://.",
                hint="For example localhost:8000 (HTTP) or grpc://localhost:8001.",
            )
        address = address.rstrip("/")
        if not address or "/" in address:
            raise UserError(f"cannot read URL '{url}': give host:port, e.g. localhost:8000 or grpc://localhost:8001.")
        if ":" not in address:
            address = f"{address}:{PROTOCOLS[protocol]}"
        return cls(protocol, address)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.address}"


@dataclass(frozen=True)
class ServedModel:
    """What the server says about the model: its interface and the export's metadata, if the config has it."""

    name: str
    input_size: tuple[int, int, int]  # (channels, height, width) of one image
    stages: int  # S: the length of each image's keep row and tokens
    classes: int
    takes_keep: bool  # False: a static export, keep baked in
    keep_required: bool  # a model repository's config makes keep required; ``ats-deploy serve``'s, optional
    max_batch_size: int  # 0: the config sets no limit
    parameters: dict[str, str]  # the model config's parameters (string values)
    outputs: tuple[str, ...] = ()  # every output's name (a --slo-ms front model adds served_keep)


class Client:
    """One connection to the server; ``timeout`` (seconds) bounds every call."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.grpc = endpoint.protocol == "grpc"
        if self.grpc:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        if self.grpc:
            self._client = module.InferenceServerClient(endpoint.address)
        else:
            self._client = module.InferenceServerClient(
                endpoint.address, connection_timeout=timeout, network_timeout=timeout
            )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A management call with the timeout, gRPC answers as JSON dicts like HTTP's."""
        if self.grpc:
            if method.startswith("get_"):
                kwargs["as_json"] = True
            kwargs["client_timeout"] = self.timeout
        return getattr(self._client, method)(*args, **kwargs)

    def live(self) -> bool:
        return bool(self._ask("is_server_live"))

    def ready(self, name: str) -> bool:
        return bool(self._ask("is_model_ready", name))

    def models(self) -> list[str]:
        """The names of the ready models, from the repository index (which PyTriton's servers restrict)."""
        index = self._ask("get_model_repository_index")
        entries = index.get("models", []) if isinstance(index, dict) else index
        return [e["name"] for e in entries if e.get("state", "READY") == "READY"]

    def metadata(self, name: str) -> dict[str, Any]:
        return self._ask("get_model_metadata", name)

    def config(self, name: str) -> dict[str, Any]:
        config = self._ask("get_model_config", name)
        return config.get("config", config) if self.grpc else config

    def infer(self, name: str, images: np.ndarray, keep: np.ndarray | None, extra: tuple[str, ...] = ()) -> tuple[
        np.ndarray, ...
    ]:
        """``logits [B, classes]`` and ``tokens [B, S]`` for ``images [B, 3, H, W]`` and ``keep [B, S]`` (or none),
        then the ``extra`` outputs asked for."""
        inputs = [self._input("images", images)]
        if keep is not None:
            inputs.append(self._input("keep", keep))
        names = ("logits", "tokens", *extra)
        outputs = [self._module.InferRequestedOutput(n) for n in names]
        if self.grpc:
            result = self._client.infer(name, inputs, outputs=outputs, client_timeout=self.timeout)
        else:
            result = self._client.infer(name, inputs, outputs=outputs)
        return tuple(result.as_numpy(n) for n in names)

    def _input(self, name: str, array: np.ndarray) -> Any:
        tensor = self._module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return tensor


def is_timeout(error: BaseException) -> bool:
    """Whether a failed call ran out of time (HTTP's socket timeout, gRPC's deadline) rather than failed."""
    if isinstance(error, TimeoutError | socket.timeout):
        return True
    status = getattr(error, "status", None)
    return callable(status) and str(status()) == "StatusCode.DEADLINE_EXCEEDED"


def is_unreachable(error: BaseException) -> bool:
    """Whether a failed call found no server at all (refused, reset, gRPC UNAVAILABLE), rather than an answer."""
    if isinstance(error, ConnectionError):
        return True
    status = getattr(error, "status", None)
    if callable(status):  # gRPC's own status; HTTP's is the server's answer (a 503 is an answer, not absence)
        return str(status()) == "StatusCode.UNAVAILABLE" and not any(
            refusal in describe_error(error) for refusal in SERVER_REFUSALS)
    return isinstance(error, OSError) and not is_timeout(error)


def is_rejection(error: BaseException) -> bool:
    """Whether the server refused the request at once (HTTP 503 / gRPC UNAVAILABLE: over capacity, queue full)."""
    status = getattr(error, "status", None)
    return callable(status) and str(status()) in ("503", "StatusCode.UNAVAILABLE") and not is_unreachable(error)


def describe_error(error: BaseException) -> str:
    """One line for a failed call: tritonclient's exceptions keep their text in ``message()``."""
    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    return f"{type(error).__name__}: {message}".strip()


def connect(endpoint: Endpoint, model: str | None, default_model: str | None = None) -> ServedModel:
    """What ``endpoint`` serves as ``model`` (else its only model, else ``default_model``), checked to be ATS's."""
    with Client(endpoint, PROBE_TIMEOUT_S) as client:
        try:
            live = client.live()
        except Exception as err:  # refused, unknown host, not Triton: each client raises its own kind
            raise unreachable(endpoint, describe_error(err)) from None
        if not live:
            raise unreachable(endpoint, "it answers but says it is not live")
        name = model or _only_model(client, endpoint, default_model)
        try:
            ready = client.ready(name)
        except Exception as err:  # the server went away between the two calls
            raise unreachable(endpoint, describe_error(err)) from None
        if not ready:
            raise UserError(
                f"model '{name}' is not ready on the Triton server at {endpoint} (unknown, still loading or failed).",
                hint="Check the server's log, or name the served model with --model-name.",
            )
        return _served(name, client.metadata(name), client.config(name), endpoint)


def unreachable(endpoint: Endpoint, why: str) -> UserError:
    return UserError(f"no Triton server answers at {endpoint} ({why}).", hint=START_SERVER)


def _only_model(client: Client, endpoint: Endpoint, default_model: str | None) -> str:
    """The one model the server lists; ``default_model`` where the index is closed (PyTriton restricts it)."""
    try:
        names = client.models()
    except Exception:  # restricted API (HTTP 403, gRPC UNAVAILABLE): fall back
        names = None
    if names is None and default_model is not None:
        return default_model
    if names is not None and len(names) == 1:
        return names[0]
    listed = f"serves {', '.join(names)}" if names else "does not list its models (PyTriton restricts that)"
    raise UserError(
        f"which model should be tested? The Triton server at {endpoint} {listed}.",
        hint="Name it with --model-name NAME (`ats-deploy serve` prints it: the file's stem), or pass --model FILE.",
    )


def _shape(entry: dict[str, Any]) -> list[int]:
    return [int(v) for v in entry.get("shape", [])]  # gRPC's JSON writes int64 as strings


def _served(name: str, metadata: dict[str, Any], config: dict[str, Any], endpoint: Endpoint) -> ServedModel:
    """The interface of ``name`` from its metadata (shapes with the batch first), or why it is not an ATS model."""
    inputs = {e["name"]: e for e in metadata.get("inputs", [])}
    outputs = {e["name"]: e for e in metadata.get("outputs", [])}
    images, logits, tokens = inputs.get("images"), outputs.get("logits"), outputs.get("tokens")
    keep = inputs.get("keep")
    problems = []
    if images is None or len(_shape(images)) != 4 or images.get("datatype") != "FP32":
        problems.append("input 'images' FP32 [batch, 3, H, W]")
    if logits is None or len(_shape(logits)) != 2:
        problems.append("output 'logits' [batch, classes]")
    if tokens is None or len(_shape(tokens)) != 2:
        problems.append("output 'tokens' [batch, S]")
    if keep is not None and (len(_shape(keep)) != 2 or tokens is None or _shape(keep)[-1] != _shape(tokens)[-1]):
        problems.append("input 'keep' FP32 [batch, S], S as in 'tokens'")
    if problems:
        raise UserError(
            f"model '{name}' at {endpoint} does not have the ATS interface: it lacks {'; '.join(problems)}.",
            hint="Serve a file `ats-deploy export` wrote, with `ats-deploy serve MODEL --profile cpu`.",
        )
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    optional = {e["name"]: e.get("optional", False) for e in config.get("input", [])}
    return ServedModel(
        name=name,
        input_size=tuple(_shape(images)[1:]),
        stages=_shape(tokens)[-1],
        classes=_shape(logits)[-1],
        takes_keep=keep is not None,
        keep_required=keep is not None and not optional.get("keep", False),
        max_batch_size=int(config.get("max_batch_size", 0)),
        parameters=parameters,
        outputs=tuple(outputs),
    )
