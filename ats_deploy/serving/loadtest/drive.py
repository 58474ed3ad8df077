"""Sending the requests: a sender per thread, closed loop (N in flight) and open loop (Poisson arrivals).

Every failure is an answer too (counted, never raised), so a run over a failing server still reports.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ats_deploy.errors import UserError

from ..triton_client import Client, describe_error, is_rejection, is_timeout, is_unreachable
from .plan import MIX_SEED, Images, Mix, Target

OPEN_LOOP_SENDERS = 32  # requests in flight at most in open loop; later arrivals wait on the client, timed
WARMUP_PER_KEEP = 2  # untimed requests per keep before the first level: connections, the server's first runs
BACKOFF_S = (0.05, 2.0)  # a sender's wait after its request found no server: first, and at most (doubling)


@dataclass
class Answer:
    """One request: what it carried, how it ended, and what came back."""

    index: int
    keep: int  # index into the mix
    images: np.ndarray  # indices into Images
    status: str  # "ok", "error" or "timeout"
    latency_ms: float  # from the scheduled arrival (open loop) or the send (closed loop) to the answer
    finished: float  # time.perf_counter() at the answer
    top1: np.ndarray | None = None
    tokens: np.ndarray | None = None  # [batch, S]
    logits: np.ndarray | None = None  # kept only for answers --verify compares
    error: str | None = None
    served_keep: float | None = None  # the mean keep the server says it ran (a --slo-ms front model's served_keep)
    unreachable: bool = False  # the error was no connection at all: the sender backs off before its next request


@dataclass
class Sender:
    """Builds request ``i`` (its images in turn, its keep from the mix) and sends it; failures are answers too."""

    target: Target
    images: Images
    mix: Mix
    batch: int
    timeout_s: float
    keep_logits: int  # answers to requests 0..keep_logits-1 keep their logits, for --verify

    def client(self) -> Client:
        return Client(self.target.endpoint, self.timeout_s)

    def inputs(self, index: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        """The image indices, the keep's index in the mix and the ``[batch, S]`` keep rows of request ``index``."""
        from ats_deploy.keep import keep_rows

        chosen = (index * self.batch + np.arange(self.batch)) % len(self.images.names)
        keep = self.mix.pick(index)
        row = self.mix.rows[keep]
        return chosen, keep, None if row is None else keep_rows(row, self.batch)

    def __call__(self, client: Client, index: int, scheduled: float) -> Answer:
        chosen, keep, rows = self.inputs(index)
        extra = ("served_keep",) if "served_keep" in self.target.served.outputs else ()
        try:
            logits, tokens, *served = client.infer(self.target.served.name, self.images.pixels[chosen], rows, extra)
        except Exception as err:  # every failure is counted, none stops the run
            finished = time.perf_counter()
            status = "timeout" if is_timeout(err) else "rejected" if is_rejection(err) else "error"
            latency_ms = (finished - scheduled) * 1e3
            return Answer(index, keep, chosen, status, latency_ms, finished, error=describe_error(err),
                          unreachable=is_unreachable(err))
        finished = time.perf_counter()
        latency_ms = (finished - scheduled) * 1e3
        status = "timeout" if latency_ms > self.timeout_s * 1e3 else "ok"
        kept = logits if index < self.keep_logits else None
        served_keep = float(np.mean(served[0])) if served else None
        return Answer(index, keep, chosen, status, latency_ms, finished, logits.argmax(-1), tokens, kept,
                      served_keep=served_keep)

    def expired(self, index: int, scheduled: float) -> Answer:
        """An open-loop arrival that waited on the client past the timeout: never sent, counted as a timeout."""
        chosen, keep, _ = self.inputs(index)
        now = time.perf_counter()
        return Answer(index, keep, chosen, "timeout", (now - scheduled) * 1e3, now, error="waited past --timeout")


def warm_up(sender: Sender) -> None:
    """A few untimed requests of every keep; the first failure stops the run with the server's own message."""
    with sender.client() as client:
        for index in range(WARMUP_PER_KEEP * len(sender.mix.rows)):
            answer = sender(client, index, time.perf_counter())
            if answer.status == "error":
                raise UserError(
                    f"the server refused a request to model '{sender.target.served.name}': {answer.error}",
                    hint="Is it an ATS export served with `ats-deploy serve`? Check the server's log.",
                )


class Backoff:
    """A sender's wait after a request that found no server, doubling up to a limit, reset by any answer.

    Without it a dead server costs thousands of failed connections a second and nothing is learnt from them.
    """

    def __init__(self) -> None:
        self.wait = 0.0

    def after(self, answer: Answer) -> None:
        if not answer.unreachable:
            self.wait = 0.0
            return
        first, most = BACKOFF_S
        self.wait = min(most, self.wait * 2 or first)
        time.sleep(self.wait)


def closed_loop(sender: Sender, concurrency: int, duration: float, tick: Callable[[float], None]) -> list[Answer]:
    """``concurrency`` senders, each sending its next request when its last is answered, for ``duration`` s."""
    answers: list[Answer] = []
    counter = itertools.count()
    start = time.perf_counter()

    def run() -> None:
        backoff = Backoff()
        with sender.client() as client:
            while time.perf_counter() - start < duration:
                answers.append(sender(client, next(counter), time.perf_counter()))
                backoff.after(answers[-1])

    threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    _join(threads, start, tick)
    return answers


def _join(threads: list[threading.Thread], start: float, tick: Callable[[float], None]) -> None:
    """Wait for every thread, ticking the progress bar meanwhile."""
    for thread in threads:
        while thread.is_alive():
            tick(time.perf_counter() - start)
            thread.join(0.1)


def arrivals(rate: float, duration: float) -> np.ndarray:
    """Poisson arrival times in ``[0, duration)``: exponential gaps of mean ``1/rate`` (seeded)."""
    generator = np.random.default_rng(MIX_SEED)
    gaps = generator.exponential(1.0 / rate, size=int(rate * duration * 2 + 20))
    times = np.cumsum(gaps)
    while times[-1] < duration:  # rare: the draw ran short
        times = np.concatenate([times, times[-1] + np.cumsum(generator.exponential(1.0 / rate, size=len(gaps)))])
    return times[times < duration]


def open_loop(sender: Sender, rate: float, duration: float, tick: Callable[[float], None],
              times: np.ndarray | None = None) -> list[Answer]:
    """Requests at Poisson arrival times (or at ``times``, s from the start); each one's latency runs from its
    scheduled arrival, queueing included."""
    answers: list[Answer] = []
    pending: queue.Queue[tuple[int, float] | None] = queue.Queue()
    schedule = arrivals(rate, duration) if times is None else times

    def run() -> None:
        backoff = Backoff()
        with sender.client() as client:
            while (item := pending.get()) is not None:
                index, scheduled = item
                if time.perf_counter() - scheduled > sender.timeout_s:
                    answers.append(sender.expired(index, scheduled))
                else:
                    answers.append(sender(client, index, scheduled))
                    backoff.after(answers[-1])

    threads = [threading.Thread(target=run, daemon=True) for _ in range(min(OPEN_LOOP_SENDERS, len(schedule) or 1))]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    for index, due in enumerate(schedule):
        wait = start + due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        pending.put((index, start + due))
        tick(due)
    for _ in threads:
        pending.put(None)
    _join(threads, start, tick)
    return answers


def quiet_collector() -> None:
    """Exempt what is loaded by now (torch, the images: ~400k objects) from Python's garbage collector.

    Its full collections took ~0.3-0.5 s on a loaded 2-core machine, during which no answer is read, so every
    request in flight showed that much more latency than the server gave it.
    """
    import gc

    gc.collect()
    gc.freeze()
