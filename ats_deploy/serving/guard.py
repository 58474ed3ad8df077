"""The HTTP front of ``ats-deploy serve``: refuses the requests that crash Triton 2.51, and answers readiness honestly.

Triton 2.51 (the server PyTriton 0.7.0 bundles, its latest) reads a JSON tensor by allocating the
bytes its declared shape needs before it looks at the data: a 100-byte request declaring
``[1000000000, 3, 224, 224]`` aborts the whole server (``std::bad_alloc``). It also inflates a gzip
body without a limit. Later Triton releases bound both (``--http-max-input-size``, 64 MiB by default);
this one has no setting for it. So Triton's HTTP listens on a private loopback port and this proxy,
on the public one, passes each request through once it has checked what it cannot crash on:

- a body over :data:`MAX_BODY` bytes, raw or inflated (``Content-Encoding: gzip`` or ``deflate`` is
  inflated here, up to that size), gets 413;
- an inference request whose JSON (the whole body, or the JSON header of a binary request) declares a
  tensor of more than :data:`MAX_BODY` bytes, or a shape that is not a list of non-negative integers,
  gets 400 naming the input.

Each inference request it passes on carries when the guard received it, as the request parameter
:data:`~.front_model.RECEIVED` (``time.monotonic_ns()``; a value the client sent is overwritten): the
front model of ``--slo-ms`` counts a request's deadline from there, not from when Triton handed it
over, so the hop to Triton and Triton's own queue count against the SLO (docs/ATS.md section 8).

It also knows what Triton cannot: while ``serve`` restarts a model instance that died (see
:mod:`.server`), readiness answers 503 and inference requests 503 at once, so a load balancer drains
the server instead of sending it requests that would fail. gRPC goes to Triton directly: its messages
are bounded by gRPC's own limits, and Triton checks a binary tensor's size against its shape.

It runs an asyncio loop on a thread of ``serve``; each client connection has its own connection to Triton.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .front_model import RECEIVED

MAX_BODY = 64 * 2**20  # bytes: what later Triton releases accept by default (--http-max-input-size)
HEAD_LIMIT = 64 * 1024  # bytes of request line and headers
BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
         "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 1}
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
READ_TIMEOUT = 30.0  # seconds a client may take to send a request's head, or its body (then 408), once it began
IDLE_TIMEOUT = 300.0  # seconds a connection may wait between requests before the guard closes it (keep-alive)
_DIGITS = re.compile(r"[0-9]+")  # a length header (str.isdigit() also takes characters int() refuses)


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, refused where it repeats a key: Python keeps the last of two keys and Triton reads the first,
    so a huge ``shape`` followed by a small one would pass :func:`check_tensors` and crash Triton."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise Refused(400, f"the request's JSON repeats the key {key!r}: send each key once")
    return members


_DECODE = json.JSONDecoder(object_pairs_hook=_unique).raw_decode
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection", "te",
        "upgrade"}
_REASONS = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Refused(Exception):
    """A request the guard answers itself: ``status`` and the ``message`` of Triton's ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def checked(header: bytes, received_ns: int) -> list[bytes | memoryview]:
    """An inference request's JSON (the whole body of a JSON request, the JSON part of a binary one), refused where
    Triton could not parse it safely (:func:`check_tensors`), with the request parameter :data:`RECEIVED` set to
    ``received_ns`` whatever the client sent there: the new JSON, in pieces to send one after another.

    The JSON is parsed once and only its ``parameters`` member is written anew (or added after the opening
    brace): a JSON body of pixels (3 MB for one 224x224 image) is neither serialized again, which would cost
    more than parsing it, nor copied.
    """
    try:
        text = header.decode()
        request, spans = _members(text)
    except (ValueError, RecursionError):
        raise Refused(400, "the request's JSON cannot be parsed") from None
    check_tensors(request)
    if not isinstance(request, dict):
        return [header]  # Triton refuses it: nothing to stamp
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict):
        raise Refused(400, f"the request's 'parameters' must be a JSON object, got {parameters!r}")
    value = json.dumps({**parameters, RECEIVED: received_ns}, separators=(",", ":"))
    if "parameters" in spans:
        begin, end = spans["parameters"]
    else:
        begin = end = text.index("{") + 1
        value = f'"parameters":{value}{"," if request else ""}'
    if not text.isascii():  # the offsets count characters: make them count bytes
        begin, end = len(text[:begin].encode()), len(text[:end].encode())
    return [memoryview(header)[:begin], value.encode(), memoryview(header)[end:]]


def check_tensors(request: object) -> None:
    """Refuse an inference request (its parsed JSON) that declares a shape Triton would allocate too much for."""
    inputs = request.get("inputs") if isinstance(request, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        if not isinstance(tensor, dict):
            continue
        name, shape = tensor.get("name"), tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise Refused(400, f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
        size = math.prod(shape) * BYTES.get(str(tensor.get("datatype")), 1)
        if size > MAX_BODY:
            raise Refused(400, f"input '{name}' declares shape {shape}, {size} bytes: a request may hold at most "
                          f"{MAX_BODY} bytes")


def _members(text: str) -> tuple[object, dict[str, tuple[int, int]]]:
    """The JSON ``text`` parsed and, where it is an object, where each member's value lies in it.

    ValueError where it is not JSON; :class:`Refused` where an object, at any depth, repeats a key (:func:`_unique`).
    """
    at = _SPACE.match(text).end()
    if not text.startswith("{", at):
        value, end = _DECODE(text, at)
        if _SPACE.match(text, end).end() != len(text):
            raise ValueError("extra data after the JSON value")
        return value, {}
    members: dict[str, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    at = _SPACE.match(text, at + 1).end()
    closed = text.startswith("}", at)
    if closed:  # {}
        at = _SPACE.match(text, at + 1).end()
    while not closed:
        key, at = _DECODE(text, at)
        at = _SPACE.match(text, at).end()
        if not isinstance(key, str) or not text.startswith(":", at):
            raise ValueError("expected a key and ':'")
        if key in members:
            raise Refused(400, f"the request's JSON repeats the key {key!r}: send each key once")
        begin = _SPACE.match(text, at + 1).end()
        members[key], end = _DECODE(text, begin)
        spans[key] = (begin, end)
        at = _SPACE.match(text, end).end()
        closed = text.startswith("}", at)
        if not closed and not text.startswith(",", at):
            raise ValueError("expected ',' or '}'")
        at = _SPACE.match(text, at + 1).end()
    if at != len(text):
        raise ValueError("extra data after the JSON object")
    return members, spans


def inflate(body: bytes, encoding: str) -> bytes:
    """``body`` decompressed, refused once it would exceed :data:`MAX_BODY` (a small gzip can hold gigabytes)."""
    if encoding not in _INFLATE:
        raise Refused(415, f"Content-Encoding '{encoding}' is not supported: send gzip, deflate or none")
    inflater = zlib.decompressobj(_INFLATE[encoding])
    try:
        data = inflater.decompress(body, MAX_BODY + 1)
    except zlib.error:
        raise Refused(400, f"the body is not valid {encoding} data") from None
    if len(data) > MAX_BODY or inflater.unconsumed_tail:
        raise Refused(413, f"the request body inflates to more than {MAX_BODY} bytes")
    return data


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    @classmethod
    def parse(cls, head: bytes) -> _Request:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise Refused(400, "malformed HTTP request line")
        headers = []
        for line in filter(None, lines[1:]):
            name, colon, value = line.partition(":")
            if not colon:
                raise Refused(400, "malformed HTTP header")
            headers.append((name.strip(), value.strip()))
        return cls(parts[0], parts[1], parts[2], headers)

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name), None)

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("connection") or "").lower()
        return connection != "close" if self.version == "HTTP/1.1" else connection == "keep-alive"


class Guard:
    """The proxy on ``host:port`` in front of Triton's HTTP on ``127.0.0.1:upstream``; ``ready`` gates readiness."""

    def __init__(self, host: str, port: int, upstream: int, model: str) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.ready = threading.Event()  # set by serve while the model can answer
        self._gated = (f"/v2/models/{model}/", "/v2/health/ready")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-guard", daemon=True)

    def start(self) -> None:
        """Listen (an :class:`OSError` if the port cannot be bound), then serve on a thread."""
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, self.host, self.port, limit=HEAD_LIMIT, reuse_address=True)
        )
        self._thread.start()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            self._loop.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            self._thread.join(timeout=5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    first = await asyncio.wait_for(reader.readexactly(1), IDLE_TIMEOUT)
                    head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                    received_ns = time.monotonic_ns()
                except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return  # the client closed the connection, left it idle, or stalled in its headers
                except asyncio.LimitOverrunError:
                    return await _answer(writer, Refused(431, f"request headers over {HEAD_LIMIT} bytes"), close=True)
                request = None
                try:
                    request = _Request.parse(head)
                    body = await asyncio.wait_for(self._body(request, reader, writer), READ_TIMEOUT)
                    body = await self._check(request, body, received_ns)
                except asyncio.TimeoutError:
                    return await _answer(writer, Refused(408, f"the request body took over {READ_TIMEOUT:g} s"),
                                         close=True)
                except Refused as refused:
                    close = not request_ok(refused) or (request is not None and not request.keep_alive)
                    await _answer(writer, refused, close=close)
                    if close:
                        return
                    continue
                if upstream is not None and upstream[0].at_eof():  # Triton closed the idle connection meanwhile
                    upstream[1].close()
                    upstream = None
                upstream = upstream or await self._connect()
                if upstream is None:
                    await _answer(writer, Refused(503, "the model is restarting"), close=False)
                    continue
                close = await self._forward(request, body, upstream, writer)
                if close or not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            for stream in (writer, upstream[1] if upstream else None):
                if stream is not None:
                    stream.close()

    async def _body(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The request body, inflated; refused when too large before reading it where the length says so."""
        length = request.header("content-length")
        chunked = "chunked" in (request.header("transfer-encoding") or "").lower()
        if length is not None and (not _DIGITS.fullmatch(length) or int(length) > MAX_BODY):
            raise Refused(413, f"the request body is over {MAX_BODY} bytes" if _DIGITS.fullmatch(length)
                          else "malformed Content-Length")
        if (request.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            body = await _chunks(reader)
        else:
            body = await reader.readexactly(int(length or 0))
        encoding = (request.header("content-encoding") or "identity").lower()
        if encoding != "identity":
            body = await _off_loop(inflate, body, encoding)
            request.headers = [(k, v) for k, v in request.headers if k.lower() != "content-encoding"]
        return body

    async def _check(self, request: _Request, body: bytes, received_ns: int) -> list[bytes | memoryview]:
        """The body to pass on, in pieces: an inference request's JSON checked and stamped with ``received_ns``."""
        path = request.target.split("?", 1)[0]
        if path.startswith(self._gated) and not self.ready.is_set():
            raise Refused(503, "the model is not ready: its instance is restarting")
        if request.method == "POST" and path.endswith("/infer"):
            length = request.header("inference-header-content-length")
            if length is not None and not (_DIGITS.fullmatch(length) and int(length) <= len(body)):
                raise Refused(400, "Inference-Header-Content-Length does not fit the body")
            header = body if length is None else body[: int(length)]
            if len(header) > HEAD_LIMIT:  # a JSON tensor of real size: parse it off the loop, the others go on
                pieces = await _off_loop(checked, header, received_ns)
            else:
                pieces = checked(header, received_ns)
            if length is not None:  # binary tensors follow the JSON, passed on as they came (no copy)
                size = str(sum(len(piece) for piece in pieces))
                request.headers = [(k, size if k.lower() == "inference-header-content-length" else v)
                                   for k, v in request.headers]
                return [*pieces, memoryview(body)[int(length):]]
            return pieces
        return [body]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection("127.0.0.1", self.upstream, limit=HEAD_LIMIT)
        except OSError:
            return None

    async def _forward(self, request: _Request, body: list[bytes | memoryview], upstream: tuple,
                       writer: asyncio.StreamWriter) -> bool:
        """Send the request to Triton and its answer back; whether the connection must close afterwards."""
        up_reader, up_writer = upstream
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{key}: {value}" for key, value in request.headers if key.lower() not in _HOP]
        lines.append(f"Content-Length: {sum(len(piece) for piece in body)}")
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for piece in body:  # not joined to the head or each other: no copy of a 600 KB body
            up_writer.write(piece)
        await up_writer.drain()
        head = await up_reader.readuntil(b"\r\n\r\n")
        response = _Request.parse(b"GET / HTTP/1.1\r\n" + head.split(b"\r\n", 1)[1])  # its headers, parsed alike
        length = response.header("content-length")
        chunked = "chunked" in (response.header("transfer-encoding") or "").lower()
        if request.method == "HEAD":
            payload = b""  # the length describes the body a GET would get
        elif length is not None:
            payload = await up_reader.readexactly(int(length))
        elif chunked:
            payload = await _relay_chunks(up_reader)
        else:
            payload = await up_reader.read()  # the length is where Triton closes the connection
        writer.write(head)
        writer.write(payload)
        await writer.drain()
        return (response.header("connection") or "").lower() == "close" or (length is None and not chunked)


async def _off_loop(work: Callable, *args: object) -> object:
    """``work(*args)`` on a worker thread: inflating or parsing megabytes must not stall every other connection."""
    return await asyncio.get_running_loop().run_in_executor(None, work, *args)


def request_ok(refused: Refused) -> bool:
    """Whether the connection can carry another request after ``refused`` (the body was read in full)."""
    return refused.status not in (408, 411, 413, 431) and "malformed" not in refused.message


async def _chunks(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, refused past :data:`MAX_BODY`."""
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            size = -1
        if size < 0:
            raise Refused(400, "malformed chunked body")
        if len(body) + size > MAX_BODY:
            raise Refused(413, f"the request body is over {MAX_BODY} bytes")
        body += await reader.readexactly(size + 2)
        del body[-2:]
        if size == 0:
            return bytes(body)


async def _relay_chunks(reader: asyncio.StreamReader) -> bytes:
    """A chunked response from Triton, kept chunked."""
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        out += size_line + await reader.readexactly(size + 2)
        if size == 0:
            return bytes(out)


async def _answer(writer: asyncio.StreamWriter, refused: Refused, close: bool) -> None:
    """Triton's error format, ``{"error": message}``, with the guard's status."""
    body = json.dumps({"error": refused.message}).encode()
    head = (f"HTTP/1.1 {refused.status} {_REASONS.get(refused.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
