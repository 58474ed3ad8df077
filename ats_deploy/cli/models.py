"""Commands on a checkpoint or a model: inspect, convert, predict, visualize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import UserError
from .common import (
    ArchOpt,
    CheckpointArg,
    KeepOpt,
    StagesOpt,
    TrustOpt,
    console,
    load,
    parse_keep,
    print_notes,
    user_errors,
)


@user_errors
def inspect(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Show a checkpoint's architecture, family, prefix tokens, parameters, stages, default keep and dense GFLOPs."""
    from ..flops import CostModel
    from ..keep import format_keep

    model = load(checkpoint, arch, stages, None, trust_checkpoint)
    cost = CostModel.of(model)
    table = Table(title=Text(checkpoint), show_header=False)
    rows = [
        ("architecture", model.arch),
        ("model family", model.family.name),
        ("prefix tokens (P)", str(model.prefix_tokens)),
        ("checkpoint format", model.checkpoint_format),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"),
        ("input size", "x".join(str(v) for v in model.input_size)),
        ("classes", str(model.num_classes)),
        ("tokens (n0)", str(model.n0)),
        ("depth / heads / dim", f"{cost.depth} / {model.vit.blocks[0].attn.num_heads} / {cost.dim}"),
        ("ATS stages", ",".join(map(str, model.stages)) or "none (dense)"),
        ("default keep", format_keep(model.default_keep)),
        ("dense GFLOPs", f"{cost.dense_gflops():.2f}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@user_errors
def convert(
    checkpoint: CheckpointArg,
    output: Annotated[str, typer.Option("-o", "--output", help="The ats-deploy checkpoint file to write.")],
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    keep: KeepOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Write a self-describing ats-deploy checkpoint (arch, stages, default keep, weights)."""
    from ..atomic import output_path
    from ..checkpoints import save_checkpoint
    from ..keep import format_keep

    target = output_path(output, None)  # a folder is refused before the checkpoint is loaded
    model = load(checkpoint, arch, stages, keep, trust_checkpoint)
    path = save_checkpoint(model, target)
    console.print(
        f"wrote [bold]{escape(str(path))}[/]: {model.arch}, stages {','.join(map(str, model.stages)) or 'none'}, "
        f"keep {format_keep(model.default_keep)}"
    )


@user_errors
def predict(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="Checkpoint (.pth/.pt/.safetensors, or random:SEED with --arch), or a model exported by ats-deploy: "
            "an ONNX file (.onnx) or a TensorRT engine (.plan/.engine).",
            show_default=False,
        ),
    ],
    images: Annotated[
        list[str],
        typer.Argument(help="Image files, or skimage:NAME for a photo shipped with scikit-image (chelsea, ...)."),
    ],
    keep: KeepOpt = None,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show.")] = 5,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Classify images with the PyTorch ATS model or an exported one: top classes, kept tokens per stage, GFLOPs.

    An exported model runs as `ats_deploy.runtime` runs it, with the pre-processing its metadata records.
    """
    from ..images import open_image
    from ..runtime import predictor

    chosen = predictor(checkpoint, parse_keep(keep), arch=arch, stages=stages, trust_code=trust_checkpoint)
    print_notes(chosen.notes)
    model = chosen.model
    result = model.predict([open_image(item) for item in images], keep=chosen.keep, top=top)
    gflops = model.gflops(result.tokens)
    for i, item in enumerate(images):
        table = Table(title=Text(f"{item}  ({gflops[i]:.2f} GFLOPs)"), title_justify="left")  # names: not markup
        table.add_column("rank", justify="right")
        table.add_column("class", justify="right")
        table.add_column("probability", justify="right")
        table.add_column("name")
        ranked = zip(result.probabilities[i].tolist(), result.classes[i].tolist(), result.labels[i], strict=True)
        for rank, (p, c, name) in enumerate(ranked, 1):
            table.add_row(str(rank), str(c), f"{p:.3f}", Text(name))
        console.print(table)
        if model.stages:
            kept = ", ".join(f"{s}:{t}" for s, t in zip(model.stages, result.tokens[i].tolist(), strict=True))
            console.print(f"kept tokens per stage (block:K'): {kept}")


@user_errors
def visualize(
    checkpoint: CheckpointArg,
    image: Annotated[
        str,
        typer.Argument(help="An image file, or skimage:NAME (a scikit-image photo).", show_default=False),
    ],
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="Token budget, as elsewhere: one value for all stages or a comma list per stage. Repeat it for "
            "one row per budget: --keep 0.9 --keep 0.5. Default: the checkpoint's keep.",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o", "--output", help="PNG to write, or a folder to write it in.", show_default="<image name>-tokens.png"
        ),
    ] = None,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Draw which tokens each ATS stage kept (the ATS paper's Fig. 2): rows are keep values, columns ATS stages."""
    from ..atomic import output_path
    from ..exporters.onnx_export import check_output_path
    from ..images import open_image
    from ..visualize import draw

    name = image.split(":", 1)[1] if image.startswith("skimage:") else Path(image).stem
    target = check_output_path(output_path(output, f"{name}-tokens.png"))
    if target.suffix.lower() != ".png":
        raise UserError(f"output {target} must be a .png file.")
    picture = open_image(image)
    model = load(checkpoint, arch, stages, None, trust_checkpoint)
    keeps = [parse_keep(text) for text in keep] if keep else None
    path, grid = draw(model, picture, f"{model.arch}: tokens kept per ATS stage, {image}", keeps, target)
    rows, cols = grid.shape
    console.print(f"wrote [bold]{escape(str(path))}[/] ({rows} x {cols} panels: keep values x ATS stages)")
