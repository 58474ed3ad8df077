"""Commands that serve a model and load a server: triton, serve, loadtest."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.text import Text

from ..errors import UserError
from .common import AllowFailedOpt, ReferenceOpt, TrustOpt, console, err_console, user_errors

if TYPE_CHECKING:
    from ..serving import adaptive as serving_adaptive
    from ..serving import deploy as serving_deploy

SloMsOpt = Annotated[
    float | None,
    typer.Option("--slo-ms", help="Latency target per request (ms): a front model lowers keep for a while when the "
                 "load would break it and raises it back when the load falls; requests that send keep get theirs."),
]
MinKeepOpt = Annotated[
    float | None, typer.Option("--min-keep", help="With --slo-ms: the lowest keep it may use (default 0.5).")
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option("--max-drop", help="With --slo-ms: the lowest setting is the tune log's cheapest within POINTS of "
                 "the dense model's top-1 (needs a tune log)."),
]
TuneLogOpt = Annotated[
    Path | None,
    typer.Option("--tune-log", help="With --slo-ms: the tune log whose Pareto front is the keep ladder (default: "
                 "the one beside a -tuned profile)."),
]


def _slo(
    slo_ms: float | None, min_keep: float | None, max_drop: float | None, tune_log: Path | None
) -> serving_adaptive.SloOptions | None:
    """``--slo-ms`` and its floor options as the serving layer's options; None without --slo-ms."""
    from ..serving.adaptive import SloOptions

    if slo_ms is None:
        given = [flag for flag, value in (("--min-keep", min_keep), ("--max-drop", max_drop),
                                          ("--tune-log", tune_log)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} sets the load-adaptive keep, which needs --slo-ms.",
                            hint="Add --slo-ms MS (the latency target), e.g. --slo-ms 100.")
        return None
    return SloOptions(slo_ms, min_keep, max_drop, tune_log)


@user_errors
def triton(
    model: Annotated[
        Path,
        typer.Argument(
            help="An ONNX file from `ats-deploy export --dynamic`, or a TensorRT engine (.plan/.engine) from "
            "`ats-deploy build` (with the ENGINE.json beside it).",
            show_default=False,
        ),
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Device profile: its serving section sets batching and instances.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The model repository folder (created if missing).")
    ] = Path("model_repository"),
    name: Annotated[
        str | None, typer.Option("--name", help="Model name in the repository (default: MODEL's file stem).")
    ] = None,
    slo_ms: SloMsOpt = None,
    min_keep: MinKeepOpt = None,
    max_drop: MaxDropOpt = None,
    tune_log: TuneLogOpt = None,
    kserve: Annotated[
        bool, typer.Option("--kserve", help="Also write REPO-kserve/: KServe InferenceService, ServingRuntime (for an "
                           "engine), HPA on Triton's queue time; checked against their schemas.")
    ] = False,
    storage_uri: Annotated[
        str | None, typer.Option("--storage-uri", help="With --kserve: where the repository is uploaded (s3://, "
                                 "gs://, pvc://CLAIM/PATH, ...).", show_default="pvc://NAME-repository")
    ] = None,
    min_replicas: Annotated[int, typer.Option("--min-replicas", min=1, help="With --kserve: fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", min=1, help="With --kserve: most replicas.")] = 4,
    allow_failed: AllowFailedOpt = False,
) -> None:
    """Write a Triton Inference Server model repository: NAME/config.pbtxt and NAME/1/model.onnx or model.plan.

    With --slo-ms, NAME is a front model (Python backend) that picks each batch's keep to hold the latency
    target and calls the model, written as NAME_inner (README: "Load-adaptive budgets").

    With --kserve, REPO-kserve/ beside the repository deploys it on Kubernetes (README: "Deploying on
    Kubernetes"); --name then also names the InferenceService, so it must be a Kubernetes name.

    Triton batches requests up to the profile's serving.max_batch_size; keep is an input with one row per
    image, so requests with different budgets share a batch. An existing NAME folder is never overwritten.
    """
    from ..profiles import load_profile
    from ..serving import kserve as deploy_kserve
    from ..serving.adaptive import front_shm_flag
    from ..serving.deploy import write
    from ..serving.repository import docker_command
    from ..serving.triton_releases import known_release

    prof = load_profile(profile)
    slo = _slo(slo_ms, min_keep, max_drop, tune_log)
    options = deploy_kserve.Options(name, storage_uri, min_replicas, max_replicas) if kserve else None
    written = write(model, prof, output, name, slo, options, console, allow_failed)
    if written.front is not None:
        front = written.front
        console.print(Text(f"front model {front.name}: SLO {slo.slo_ms:g} ms, keep ladder {front.describe()}"))
        console.print(Text(f"add {front_shm_flag()} to tritonserver's options: the front passes whole batches "
                           "of images to the model (README, \"Load-adaptive budgets\")."), soft_wrap=True)
    repository = written.repository
    config = repository.config
    batching = f"batches up to {config.max_batch_size}" if config.max_batch_size else "no batching (static export)"
    console.print(f"wrote [bold]{escape(str(repository.folder))}[/]: {config.platform}, {batching}, "
                  f"{config.instance_group[0].count} instance(s) on the {'GPU' if repository.on_gpu else 'CPU'}")
    release = known_release(repository.source.tensorrt_version)
    if repository.source.tensorrt_version:
        console.print(f"the engine needs TensorRT {repository.source.tensorrt_version}: " + (
            f"Triton {release} ships it." if release else
            "pick the Triton release that ships it (NVIDIA's frameworks support matrix) for <yy.mm>."))
    console.print("[bold]serve it[/] with NVIDIA's Triton container:")
    console.print(Text(docker_command(output, repository.on_gpu, release or "<yy.mm>")), soft_wrap=True,
                  highlight=False)
    if written.kserve is not None:
        _print_kserve(written, output)


def _print_kserve(written: serving_deploy.Written, repository: Path) -> None:
    """Say what ``REPO-kserve/`` holds and how to deploy it and reach the endpoint."""
    from ..serving import kserve

    deployment, folder = written.kserve, written.kserve_folder
    console.print(Text(f"wrote {folder}: {', '.join(deployment.files)}; checked against "
                       f"{' and '.join(deployment.checked_against)}"), soft_wrap=True, highlight=False)
    if deployment.triton_release:
        console.print(f"the engine runs in Triton {deployment.triton_release} "
                      f"(nvcr.io/nvidia/tritonserver:{deployment.triton_release}-py3), whose TensorRT built it")
    upload = kserve.upload_hint(deployment.storage_uri, repository)
    steps = [f"upload {repository} to {deployment.storage_uri}: {upload}",
             f"install prometheus-adapter with the rule in {folder / kserve.ADAPTER_FILE}",
             f"kubectl apply -f {folder}",
             f"kubectl port-forward service/{deployment.name}{kserve.PREDICTOR} 8000:80, then ats-deploy loadtest "
             f"localhost:8000 --model-name {deployment.entry_model} --data IMAGES"]
    console.print("[bold]deploy it[/] on Kubernetes:")
    for number, step in enumerate(steps, 1):
        console.print(Text(f"{number}. {step}"), soft_wrap=True, highlight=False)


@user_errors
def serve(
    model: Annotated[
        Path,
        typer.Argument(help="An ONNX file from `ats-deploy export --dynamic`, or a TensorRT engine from "
                       "`ats-deploy build` (for a TensorRT profile).", show_default=False),
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Device profile: backend, precision, threads, default keep, batching.")
    ],
    http_port: Annotated[int, typer.Option("--http-port", min=1, max=65535, help="Triton's HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", min=1, max=65535, help="Triton's gRPC port.")] = 8001,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=1, max=65535, help="Triton's Prometheus metrics port.")
    ] = 8002,
    slo_ms: SloMsOpt = None,
    min_keep: MinKeepOpt = None,
    max_drop: MaxDropOpt = None,
    tune_log: TuneLogOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="The address all three ports listen on: 127.0.0.1 serves this machine "
                          "only, 0.0.0.0 every network interface (anyone who reaches a port can run the model).")
    ] = "127.0.0.1",
    allow_failed: AllowFailedOpt = False,
) -> None:
    """Serve MODEL with NVIDIA Triton Inference Server (PyTriton's) until Ctrl-C or SIGTERM.

    Inputs: images FP32 [3, H, W] and, optional, keep FP32 [S] (default: the profile's); outputs logits and
    tokens. Triton's dynamic batcher batches requests with different keep rows together; a request with a bad
    keep gets its own error without failing the others; past the profile's queue bound (serving.max_queue_size,
    serving.queue_timeout_ms) requests are refused at once with 503. Health, readiness and metrics are Triton's.
    """
    from ..serving.server import Ports
    from ..serving.server import serve as run_server

    run_server(model, profile, Ports(http_port, grpc_port, metrics_port), console,
               _slo(slo_ms, min_keep, max_drop, tune_log), host=host, allow_failed=allow_failed)



@user_errors
def loadtest(
    url: Annotated[
        str,
        typer.Argument(help="The Triton server: host:port (HTTP, e.g. localhost:8000) or grpc://host:port.",
                       show_default=False),
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="Images in ImageFolder layout (`DIR/<class>/<image>`, wnid folders map to "
                     "ImageNet indices) for top-1 accuracy, or a flat folder of images (no accuracy)."),
    ],
    concurrency: Annotated[
        str | None,
        typer.Option("--concurrency", help="Closed loop: requests in flight, one level each, e.g. 1,4,16."),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option("--rate", help="Open loop: Poisson arrivals per second, one level each, e.g. 20,40. Latency "
                     "runs from each request's scheduled arrival, so overload shows as growing latency."),
    ] = None,
    duration: Annotated[float, typer.Option("--duration", help="Seconds per level.")] = 10.0,
    keep: Annotated[
        str | None,
        typer.Option("--keep", help="Keeps to mix, comma-separated (each request picks one), e.g. 0.5,0.7,1.0; a "
                     "per-stage keep joins its values with ':'. Default: none sent (the server's default)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per request.")] = 1,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds after which a request counts as timed out.")
    ] = 10.0,
    images: Annotated[int | None, typer.Option("--images", min=1, help="At most N images of --data.")] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The served model (default: the server's only model).")
    ] = None,
    model_file: Annotated[
        Path | None,
        typer.Option("--model", help="The exported file the server serves, for its pre-processing and --verify "
                     "(default: the server's model config, else timm's defaults)."),
    ] = None,
    verify: Annotated[
        int, typer.Option("--verify", min=0, help="Compare N answers with the PyTorch reference; exit 1 on a "
                          "mismatch that is not a float-tie flip.")
    ] = 0,
    step_seconds: Annotated[
        float | None,
        typer.Option("--step-seconds", help="The --rate values become one schedule: each rate for this many "
                     "seconds, in turn, repeated to fill --duration (bursts: --rate 40,110 --step-seconds 10 "
                     "--duration 60); reported per step."),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Send at the arrival times in FILE (seconds from the start, one per line); "
                     "reported in windows of --step-seconds (default 10)."),
    ] = None,
    slo_ms: Annotated[
        float | None,
        typer.Option("--slo-ms", help="Report SLO attainment: the share of requests sent answered without error "
                     "within MS of their scheduled arrival, per step and overall (errors and refusals miss)."),
    ] = None,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder for results.json, results.csv and the latency-throughput plot.",
                     show_default="./results/<time>-loadtest/"),
    ] = None,
    max_error_rate: Annotated[
        float, typer.Option("--max-error-rate", help="Exit 1 when a larger share of requests fails (errors, not "
                            "timeouts), e.g. 0.05; the figures are printed and written first.")
    ] = 0.01,
) -> None:
    """Load a Triton server serving an ATS model: throughput, latency percentiles, errors, kept tokens, top-1.

    Closed loop (--concurrency) and open loop (--rate) levels run for --duration seconds each, on the images of
    --data pre-processed as the export says, with keep mixed per request (--keep).
    """
    from ..serving.loadtest.plan import Request
    from ..serving.loadtest.report import render
    from ..serving.loadtest.run import loadtest as run_loadtest
    from ..serving.loadtest.statistics import check_errors

    request = Request(
        url=url, data=data, concurrency=concurrency, rate=rate, duration=duration, keep=keep, batch=batch,
        timeout=timeout, images=images, model_name=model_name, model_file=model_file, verify=verify,
        checkpoint=checkpoint, trust_checkpoint=trust_checkpoint, output=output,
        step_seconds=step_seconds, trace=trace, slo_ms=slo_ms, max_error_rate=max_error_rate,
    )
    result, files = run_loadtest(request, err_console, show=lambda measured: render(measured, console))
    console.print(Text(f"wrote {files[0].parent}/: {', '.join(p.name for p in files)}"), highlight=False)
    check_errors(result, max_error_rate)
    if result.verification is not None:
        result.verification.check()

