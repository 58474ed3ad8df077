"""``ats-deploy loadtest``: drive a Triton server serving an ATS model, closed and open loop, and report.

Closed loop (``--concurrency``): N senders, each sending its next request as soon as
its last one is answered, for ``--duration`` seconds. Open loop (``--rate``): requests
arrive at Poisson times, R per second, whatever the server does; latency is measured
from each request's scheduled arrival, so a server that cannot keep up shows latency
growing with its backlog instead of a sender that quietly slows down (coordinated
omission). Each request carries ``--batch`` images of DIR, pre-processed as the
export's metadata says, and one keep of the ``--keep`` mix. ``--verify N`` compares N
answers with the PyTorch reference as ``ats-deploy validate`` does: float-tie flips are
named, anything else is a mismatch.

One module per step, each importing only the ones before it: :mod:`.plan` (what was asked, checked against
the server, and the images), :mod:`.drive` (the senders and the two loops), :mod:`.statistics` (each level's
figures), :mod:`.verify` (answers against the reference), :mod:`.report` (table, files, plots) and :mod:`.run`
(the whole run, in that order).
"""
