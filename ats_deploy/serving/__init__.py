"""Serving exported ATS models with Triton Inference Server (model repositories: :mod:`.repository`).

Triton batches requests from many clients into one run; the ``keep`` input is ``[batch, S]``
(docs/ATS.md section 4), so requests with different token budgets share a batch.
"""
