"""What a compatibility check finds, and how ``ats-deploy check`` prints it: findings, errors first, then a verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

Severity = Literal["error", "warning"]


@dataclass
class Finding:
    severity: Severity
    node: str  # node name ("parent/child" inside subgraphs), "" for the graph itself
    op: str
    message: str


@dataclass
class CompatReport:
    target: str
    findings: list[Finding] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    dla: DlaShare | None = None  # target "dla": where the layers would run

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class DlaShare:
    """Where a TensorRT DLA build (with GPU fallback) would run the model's layers (counted by :mod:`.dla`).

    A layer is a node left after constant folding; MACs are those of MatMul, Gemm and
    Conv where shapes are known, the bulk of a ViT's work. A static estimate: TensorRT
    decides per layer when it builds, and may refuse more (DLA-specific limits on sizes).
    """

    layers: int = 0
    dla_layers: int = 0
    macs: int = 0
    dla_macs: int = 0
    subgraphs: int = 0  # DLA subgraphs the DLA layers form, before the per-core limit

    @property
    def fallback(self) -> bool:
        return self.dla_layers < self.layers

    def summary(self) -> str:
        """``"3.1% of MACs, 40 of 500 layers on the DLA"``."""
        macs = f"{100 * self.dla_macs / self.macs:.1f}% of MACs, " if self.macs else ""
        return f"{macs}{self.dla_layers} of {self.layers} layers on the DLA"


def render(report: CompatReport, console: Console) -> None:
    """Print the findings, errors first, then a one-line verdict."""
    if report.findings:
        table = Table(title=f"{report.target}: {len(report.errors)} errors, {len(report.warnings)} warnings")
        for column in ("severity", "node", "op", "message"):
            table.add_column(column, overflow="fold")
        for f in sorted(report.findings, key=lambda f: f.severity != "error"):
            style = "bold red" if f.severity == "error" else "yellow"
            table.add_row(Text(f.severity, style=style), Text(f.node or "(graph)"), Text(f.op), Text(f.message))
        console.print(table)
    text, style = _verdict(report)
    console.print(Text(text, style=style))


def _verdict(report: CompatReport) -> tuple[str, str]:
    """One line and its style; a DLA build that falls back to the GPU says how much stays on the DLA."""
    if not report.ok:
        count = len({f.node for f in report.errors})
        noun = "node" if count == 1 else "nodes"
        return f"{count} incompatible {noun} for {report.target}", "bold red"
    count = len(report.warnings)
    suffix = f" ({count} warning{'' if count == 1 else 's'})" if count else ""
    if report.dla is not None and report.dla.fallback:
        return f"runs on {report.target} with GPU fallback: {report.dla.summary()}{suffix}", "bold yellow"
    return f"compatible with {report.target}{suffix}", "bold green"
