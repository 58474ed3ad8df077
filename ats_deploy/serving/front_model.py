"""The front model: Triton's Python backend applying the load-adaptive policy (:mod:`.policy`) before the model.

``ats-deploy serve --slo-ms`` and ``ats-deploy triton --slo-ms`` both write this file (as ``model.py``)
and :mod:`.policy` (as ``slo_policy.py``) into a model folder beside the ATS model, so the same code
runs in both; it needs numpy and Triton's Python backend only, no ats-deploy install.

Why a front model: Triton's dynamic batcher hides its queue and arrival times from the model it
feeds, and the policy needs both. The front's ``execute`` only timestamps each request (with when it
reached the server where ``serve``'s HTTP guard stamped it, :data:`RECEIVED`; else now), refuses it at
once when even the floor could not answer it within the SLO (``UNAVAILABLE``), and queues it; it
returns without answering (the response sender answers later, one response per request). One
scheduler thread asks the policy for the next batch's keep, calls the model (BLS) with every
request's keep row (its own where it sent one, else the policy's) and answers each request with
``logits``, ``tokens`` and ``served_keep``, the keep row it ran; the time from the policy's decision to
the model call and from the model's end to the batch's last answer is the policy's overhead outside
the model (its deadlines leave room for it). At start-up the thread measures the
model's batch latency at each rung (a few seconds) unless the config carries a latency table;
until then requests are refused with ``UNAVAILABLE`` (the ``ats_slo_ready`` metric turns 1 when done, -1
when the model never answered).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from . import policy as slo
except ImportError:  # in a Triton model folder: policy.py lies beside this file as slo_policy.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import slo_policy as slo  # type: ignore[no-redef]

PARAMETER = "ats_deploy_slo"  # the model config parameter that carries the front's settings, as JSON
RECEIVED = "ats_received_ns"  # request parameter: time.monotonic_ns() when serve's HTTP guard received the request
CALIBRATION_ROUNDS = 3  # timed batches per rung and batch size at start-up (the median is kept), after a warm-up
START_TIMEOUT_S = 120.0  # how long start-up waits for the model to load before giving up


@dataclass(frozen=True)
class FrontSettings:
    """What the front model needs: the model it calls, the SLO, the ladder, and the latency table if known."""

    model: str  # the ATS model's name in the same repository
    slo_ms: float
    max_batch: int  # images per call to the model (its max_batch_size)
    ladder: list[list[float]]  # keep rows, full budget first, the floor last
    accuracy: list[float | None]  # each rung's top-1 where a tune log measured it
    input_shape: list[int]  # one image: [3, H, W]
    calibration_batches: list[int]  # batch sizes measured at start-up
    latency: list[dict[str, float]] | None = None  # seconds per rung and batch size; None: measure at start-up

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> FrontSettings:
        return cls(**json.loads(text))


@dataclass
class _Waiting:
    arrival: float
    sender: Any
    images: np.ndarray
    keep: np.ndarray | None  # the request's own rows, or None: the policy's


def request_problem(images: np.ndarray | None, keep: np.ndarray | None) -> str | None:
    """Why a request cannot run, or None: checked here because one bad request would fail the model's whole batch.

    Images must be there and finite; keep rows (spec section 2) finite, > 0, a whole number above 1.
    """
    if images is None:
        return "the request has no input 'images'"
    if not np.isfinite(images).all():
        return "input 'images' holds NaN or infinite pixel values: send finite FP32 pixels"
    if keep is None:
        return None
    if len(keep) != len(images):
        return f"keep has {len(keep)} rows for {len(images)} images: send one row per image (or no keep)"
    bad = ~np.isfinite(keep) | (keep <= 0) | ((keep > 1) & (keep != np.round(keep)))
    if bad.any():
        return f"keep value {keep[bad][0]!r} is not a fraction in (0, 1] or a whole number of tokens"
    return None


def arrival(parameters: str, now: float, slo_s: float) -> float:
    """When a request reached the server, from its parameters (``request.parameters()``, a JSON string): the
    guard's :data:`RECEIVED` stamp, else ``now``, when the front model got it.

    CLOCK_MONOTONIC is one clock for the whole machine, so the guard's stamp and this process's ``now`` compare.
    A stamp is kept within ``[now - slo_s, now]``: a gRPC client, which reaches Triton without the guard, could
    send one, and the most a forged one does then is make its own request expire.
    """
    try:
        stamped = json.loads(parameters or "{}").get(RECEIVED)
    except (ValueError, AttributeError):
        return now
    if type(stamped) is not int:
        return now
    return min(max(stamped / 1e9, now - slo_s), now)


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize`` once, ``execute`` per group of requests, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.settings = FrontSettings.from_json(config["parameters"][PARAMETER]["string_value"])
        s = self.settings
        self.rows = [np.asarray(row, dtype=np.float32) for row in s.ladder]
        self.ladder = [slo.Rung(tuple(row), acc) for row, acc in zip(s.ladder, s.accuracy, strict=True)]
        self.policy: slo.SlackFit | None = None
        self.meter = slo.RateMeter()
        self.waiting: deque[_Waiting] = deque()
        self.lock = threading.Condition()
        self.busy_until = 0.0
        self.stopping = False
        self.problem: str | None = None  # set when start-up failed: every request is answered with it
        self.metrics = _Metrics(pb_utils, self.name)
        gc.collect()
        gc.freeze()  # a full collection stalls whichever batch runs; what start-up made lives as long as the model
        self.thread = threading.Thread(target=self._run, name="ats-slo-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ requests in

    def execute(self, requests: list) -> None:
        """Timestamp, check and queue each request; the scheduler thread answers them."""
        now = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            sent_images = self.pb.get_input_tensor_by_name(request, "images")
            images = None if sent_images is None else sent_images.as_numpy()
            sent = self.pb.get_input_tensor_by_name(request, "keep")
            keep = None if sent is None else sent.as_numpy()
            problem = request_problem(images, keep)
            if problem:
                self._refuse(sender, problem, self.pb.TritonError.INVALID_ARG, "invalid")
                continue
            assert images is not None
            arrived = arrival(request.parameters(), now, self.settings.slo_ms / 1e3)
            with self.lock:
                self.meter.add(now)
                place = self._place(arrived)
                refusal = self._admission(now, arrived, place)
                if refusal is None:
                    self.waiting.insert(place, _Waiting(arrived, sender, images, keep))
                    self.metrics.queue.set(len(self.waiting))
                    self.lock.notify()
            if refusal is not None:
                self._refuse(sender, refusal, self.pb.TritonError.UNAVAILABLE, "refused")
        return None

    def _place(self, arrived: float) -> int:
        """Where a request that arrived at ``arrived`` goes in the queue: the policy wants the oldest first, and
        requests stamped by the guard can reach the front out of order (called with the lock held)."""
        place = len(self.waiting)
        while place and self.waiting[place - 1].arrival > arrived:
            place -= 1
        return place

    def _admission(self, now: float, arrived: float, ahead: int) -> str | None:
        """Why a request that arrived at ``arrived`` is refused now, or None to queue it behind ``ahead`` others
        (called with the lock held)."""
        if self.problem:
            return self.problem
        if self.policy is None:
            return "the server is measuring this device's latency at start-up (a few seconds); retry shortly"
        if not self.policy.admit(now, ahead, self.busy_until, arrived):
            floor = self.ladder[-1].label
            return (f"over capacity: even at the lowest keep ({floor}) this request could not be answered within "
                    f"the {self.settings.slo_ms:g} ms SLO; retry later or add replicas")
        return None

    def _refuse(self, sender: Any, message: str, code: int, outcome: str) -> None:
        error = self.pb.TritonError(message, code)
        sender.send(self.pb.InferenceResponse(error=error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.metrics.count(outcome)

    # ------------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        try:
            latency = self._latency()
        except Exception as exc:  # the model never answered: refuse everything, say why in the log
            self._fail(f"the front model could not measure model '{self.settings.model}': {exc}")
            return
        floor_alone = latency.seconds(len(self.ladder) - 1, 1) * 1e3
        if floor_alone > self.settings.slo_ms:  # measured once, maybe in a busy moment: say so, serve anyway
            self.pb.Logger.log_warn(
                f"ats-deploy front model '{self.name}': the SLO of {self.settings.slo_ms:g} ms is below what the "
                f"model took alone at its lowest keep at start-up ({floor_alone:.1f} ms); requests will be refused "
                "until it runs faster. Restart with a larger --slo-ms if this persists.")
        settings = slo.Settings(self.settings.slo_ms / 1e3, self.settings.max_batch)
        with self.lock:
            self.policy = slo.SlackFit(self.ladder, latency, settings)
        self.metrics.ready.set(1)
        self.metrics.keep.set(float(self.rows[0].mean()))
        while True:
            try:
                if not self._serve_next():
                    return
            except Exception as exc:  # one failed answer (a client gone) must not stop the scheduler
                self.pb.Logger.log_error(f"ats-deploy front model '{self.name}': {exc!r}")

    def _fail(self, problem: str) -> None:
        self.pb.Logger.log_error(problem)
        self.metrics.ready.set(-1)
        with self.lock:
            self.problem = problem
            stranded = list(self.waiting)
            self.waiting.clear()
        for item in stranded:
            self._refuse(item.sender, problem, self.pb.TritonError.UNAVAILABLE, "refused")

    def _serve_next(self) -> bool:
        with self.lock:
            while not self.waiting and not self.stopping:
                self.lock.wait()
            if self.stopping:
                return False
            now = time.monotonic()
            assert self.policy is not None
            decision = self.policy.decide(now, [w.arrival for w in self.waiting], self.meter.rate(now))
            expired = [self.waiting.popleft() for _ in range(decision.expired)]
            batch = self._take(decision.batch)
            self.busy_until = now + self.policy.latency.seconds(decision.rung, max(len(batch), 1))
            self.metrics.queue.set(len(self.waiting))
        for item in expired:
            self._refuse(item.sender, f"dropped: it waited past its {self.settings.slo_ms:g} ms SLO in the queue",
                         self.pb.TritonError.UNAVAILABLE, "dropped")
        if batch:
            self._answer(batch, decision.rung, now)
            with self.lock:  # free now: a batch that ended before its predicted end must not turn arrivals away
                self.busy_until = min(self.busy_until, time.monotonic())
        return True

    def _take(self, requests: int) -> list[_Waiting]:
        """Up to ``requests`` of the oldest waiting requests, as many as fit in one call to the model."""
        batch: list[_Waiting] = []
        images = 0
        while self.waiting and len(batch) < requests:
            size = len(self.waiting[0].images)
            if batch and images + size > self.settings.max_batch:
                break
            batch.append(self.waiting.popleft())
            images += size
        return batch

    def _answer(self, batch: list[_Waiting], rung: int, decided: float) -> None:
        """Run the batch on the model, each request with its keep rows, and answer every request.

        ``decided``: when the policy chose the batch; the time to the model call, and from the model's end to the
        last answer sent, is what the batch spent outside the model (``observe_overhead``).
        """
        rows = [item.keep if item.keep is not None else np.tile(self.rows[rung], (len(item.images), 1))
                for item in batch]
        start = time.monotonic()
        try:
            logits, tokens = self._infer(np.concatenate([i.images for i in batch]), np.concatenate(rows))
        except RuntimeError as exc:
            for item in batch:
                self._refuse(item.sender, f"the model failed on this batch: {exc}", self.pb.TritonError.INTERNAL,
                             "error")
            return
        done = time.monotonic()
        assert self.policy is not None
        self.policy.latency.observe(rung, len(batch), done - start)
        self.metrics.keep.set(float(self.rows[rung].mean()))
        self.metrics.rung.set(rung)
        offset = 0
        for item, keep in zip(batch, rows, strict=True):
            end = offset + len(item.images)
            outputs = [self.pb.Tensor("logits", logits[offset:end]), self.pb.Tensor("tokens", tokens[offset:end]),
                       self.pb.Tensor("served_keep", keep.astype(np.float32))]
            item.sender.send(self.pb.InferenceResponse(output_tensors=outputs),
                             flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.metrics.count("met" if time.monotonic() - item.arrival <= self.settings.slo_ms / 1e3 else "missed")
            offset = end
        self.policy.observe_overhead(start - decided + time.monotonic() - done)
        self.metrics.overhead.set(self.policy.overhead_s)

    def _infer(self, images: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One call to the model (BLS); RuntimeError with the model's message when it fails."""
        pb = self.pb
        request = pb.InferenceRequest(model_name=self.settings.model, requested_output_names=["logits", "tokens"],
                                      inputs=[pb.Tensor("images", images), pb.Tensor("keep", keep)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return (pb.get_output_tensor_by_name(response, "logits").as_numpy(),
                pb.get_output_tensor_by_name(response, "tokens").as_numpy().astype(np.int64))

    def _latency(self) -> slo.LatencyModel:
        """The configured latency table, else one measured now: each rung at each calibration batch size."""
        if self.settings.latency is not None:
            return slo.LatencyModel.from_dict(self.settings.latency)
        pixels = np.random.default_rng(0).standard_normal(
            (self.settings.max_batch, *self.settings.input_shape)).astype(np.float32)
        self._wait_for_model(pixels[:1], self.rows[0][None])
        sizes = self.settings.calibration_batches
        timed = np.zeros((CALIBRATION_ROUNDS, len(self.rows), len(sizes)))
        for round_ in range(CALIBRATION_ROUNDS + 1):  # rounds interleaved: a slow spell of the machine hits one
            for r, row in enumerate(self.rows):
                for b, size in enumerate(sizes):
                    start = time.monotonic()
                    self._infer(pixels[:size], np.tile(row, (size, 1)))
                    if round_:  # the first round warms up
                        timed[round_ - 1, r, b] = time.monotonic() - start
        # The median, not the fastest: the fastest of a few runs under-predicts a typical batch, and at the floor,
        # where every batch runs near its deadline, that bias turns into late answers.
        typical = np.maximum.accumulate(np.median(timed, axis=0), axis=1)  # a larger batch never takes less time
        points = [dict(zip(sizes, times.tolist(), strict=True)) for times in typical]
        table = slo.LatencyModel(points)
        measured = "; ".join(f"{rung.label}: " + ", ".join(f"{b}: {1e3 * t:.1f}" for b, t in p.items())
                             for rung, p in zip(self.ladder, points, strict=True))
        self.pb.Logger.log_warn(f"ats-deploy front model '{self.name}' measured ms per batch at each keep: {measured}")
        return table

    def _wait_for_model(self, images: np.ndarray, keep: np.ndarray) -> None:
        """Call the model until it answers: Triton may still be loading it when this thread starts."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._infer(images, keep)
                return
            except RuntimeError:
                if time.monotonic() > deadline or self.stopping:
                    raise
                time.sleep(0.2)

    def finalize(self) -> None:
        """Stop the scheduler; requests still waiting are answered UNAVAILABLE."""
        with self.lock:
            self.stopping = True
            stranded = list(self.waiting)
            self.waiting.clear()
            self.lock.notify_all()
        for item in stranded:
            self._refuse(item.sender, "the server is stopping", self.pb.TritonError.UNAVAILABLE, "refused")
        self.thread.join(timeout=5)


class _Metrics:
    """Prometheus metrics next to Triton's own (Python-backend custom metrics), labelled with the model's name."""

    OUTCOMES = ("met", "missed", "refused", "dropped", "invalid", "error")

    def __init__(self, pb: Any, model: str) -> None:
        gauge, counter = pb.MetricFamily.GAUGE, pb.MetricFamily.COUNTER
        labels = {"model": model}
        self.families = [
            pb.MetricFamily("ats_slo_keep", "Mean keep of the rung the last batch ran at", gauge),
            pb.MetricFamily("ats_slo_rung", "Rung of the keep ladder the last batch ran at (0: full budget)", gauge),
            pb.MetricFamily("ats_slo_queue", "Requests waiting in the front model", gauge),
            pb.MetricFamily("ats_slo_ready", "1 once the front model measured the latencies and serves, -1: failed "
                            "(its log says why)", gauge),
            pb.MetricFamily("ats_slo_overhead_seconds", "Running estimate of a request's time outside the model "
                            "(batch preparation, answers sent), taken off the SLO when planning", gauge),
            pb.MetricFamily("ats_slo_requests", "Requests by outcome: met or missed the SLO, refused, dropped, "
                            "invalid, error", counter),
        ]
        self.keep, self.rung, self.queue, self.ready, self.overhead = (f.Metric(labels=labels)
                                                                      for f in self.families[:5])
        self.outcomes = {o: self.families[5].Metric(labels={**labels, "outcome": o}) for o in self.OUTCOMES}

    def count(self, outcome: str) -> None:
        self.outcomes[outcome].increment(1)
