"""Benchmarks and accuracy/latency reports of exported ATS models against the PyTorch reference."""
