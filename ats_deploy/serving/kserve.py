"""A Triton model repository deployed on Kubernetes with KServe, its replicas following Triton's queue time.

``ats-deploy triton MODEL --profile P -o REPO --kserve`` writes ``REPO-kserve/`` beside the repository:

- ``1-servingruntime.yaml`` (TensorRT engines only): a ServingRuntime pinned to the Triton container
  whose TensorRT built the engine (:mod:`.triton_releases`); an ONNX model runs in KServe's built-in
  ``kserve-tritonserver`` runtime instead, whichever Triton the cluster configured for it;
- ``2-inferenceservice.yaml``: the InferenceService serving the repository from its storage URI, its
  resources from the profile, in KServe's Standard (raw Deployment) mode with an external autoscaler;
- ``3-hpa.yaml``: a HorizontalPodAutoscaler on Triton's mean queue time per request (and, with a
  ``--slo-ms`` front model, on how far that model lowered keep), which ``prometheus-adapter/values.yaml``
  (the adapter rules; not applied by ``kubectl apply -f``, which does not descend into folders) makes
  available to it.

The folder is beside the repository, not in it: Triton loads every folder of its repository as a model
and refuses to start on one without a model config (Triton 2.51: "failed to load all models"), and
KServe downloads the whole repository. Every object is checked against its schema (:mod:`.k8s_check`)
before the folder is written, and the folder appears whole or not at all.

Why an HPA on queue time, and not KEDA: the HPA is built into every cluster and only needs the metrics
adapter most Prometheus set-ups already run; its ``behavior`` states how fast replicas come and go; it is
checked here against Kubernetes' own schema. KEDA would add an operator for what it does better, scaling
to zero, which a Triton pod that takes a minute to load its model should not do (and KServe's Standard
mode does not do). Queue time, not CPU or GPU utilisation: a batched model is busiest when it batches
well, so utilisation says little about waiting; the time requests spend queued beyond the batcher's own
delay is what grows when a replica is saturated and what users feel.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from ..atomic import cannot_write, write_folder
from ..errors import UserError
from ..profiles import Profile
from . import k8s_check
from . import repository as repo
from .adaptive import INNER_SUFFIX
from .triton_releases import IMAGE, release_for

SUFFIX = "-kserve"
RUNTIME_FILE = "1-servingruntime.yaml"
SERVICE_FILE = "2-inferenceservice.yaml"
HPA_FILE = "3-hpa.yaml"
ADAPTER_FILE = "prometheus-adapter/values.yaml"
BUILT_IN_RUNTIME = "kserve-tritonserver"  # KServe's ClusterServingRuntime for Triton (config/runtimes/)
# KServe's InferenceService names (its validating webhook's IsvcNameFmt): a DNS-1035 label.
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Standard mode names the Deployment and Service NAME-predictor; a Service name has at most 63 characters.
PREDICTOR = "-predictor"
MAX_NAME = 63 - len(PREDICTOR)
_CLAIM = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123 subdomain
# Where KServe's storage initializer can fetch a model repository from, and how to put it there.
STORAGE = {
    "s3": "an S3 (or S3-compatible) bucket: aws s3 sync {repo} {uri}",
    "gs": "a Google Cloud Storage bucket: gcloud storage rsync --recursive {repo} {uri}",
    "pvc": "a PersistentVolumeClaim of the InferenceService's namespace: copy {repo}'s contents into it, e.g. with "
           "kubectl cp through a pod that mounts the claim",
    "https": "an Azure Blob Storage folder, or a .tar.gz or .zip archive of {repo} on an HTTPS server",
    "hdfs": "an HDFS folder: hdfs dfs -put {repo} {uri}",
    "webhdfs": "an HDFS folder through WebHDFS: hdfs dfs -put {repo} {uri}",
}
_MATCH = "{<<.LabelMatchers>>}"


@dataclass(frozen=True)
class Signal:
    """A per-pod metric the HPA scales on, and the prometheus-adapter rule computing it from a Prometheus series."""

    name: str  # the metric as the HPA asks for it
    series: str  # the series the pods export
    query: str  # the adapter's metricsQuery
    meaning: str  # for the files' comments


# Triton's counters (its metrics documentation): microseconds requests waited in the scheduler queue, and
# requests answered; the ratio of their rates is the mean queue time per request. The success rate is clamped
# at 0.001/s so that an idle pod reads 0 us, not NaN (which leaves the HPA without a value).
QUEUE_TIME = Signal(
    "nv_inference_queue_duration_us_per_request", "nv_inference_queue_duration_us",
    f"sum by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{_MATCH}[1m])) / clamp_min(sum by (<<.GroupBy>>) "
    f"(rate(nv_inference_request_success{_MATCH}[1m])), 0.001)",
    "Triton's mean queue time per request (nv_inference_queue_duration_us over nv_inference_request_success)")
# The front model's gauge (front_model._Metrics): the keep ladder's rung of the last batch, 0 at full keep.
# Averaged over a minute it says how far below full keep the replica had to go to hold the SLO.
KEEP_RUNG = Signal(
    "ats_slo_rung_mean", "ats_slo_rung", f"avg by (<<.GroupBy>>) (avg_over_time(ats_slo_rung{_MATCH}[1m]))",
    "the front model's mean keep-ladder rung over a minute (ats_slo_rung, 0 at full keep)")
# Half a rung on average: replicas double when every batch runs one rung down, and go when all run at full keep.
RUNG_TARGET = "500m"
# Mean queue time beyond the batcher's own delay that means a replica is saturated: requests then wait for a
# free instance, not for a batch to fill.
BUSY_WAIT_US = 5_000
# Up at once, by at most 2 pods a minute; down only after five quiet minutes, one pod every 2 minutes: a new
# Triton pod needs minutes (image pull, repository download, engine or session creation) before it takes load.
BEHAVIOR = {
    "scaleUp": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
    "scaleDown": {"stabilizationWindowSeconds": 300,
                  "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
}
# Memory estimates (requests = limits): the server and its backend before any model, plus two copies of the
# model per instance (the file as read, the runtime's own); a GPU pod also holds the CUDA context on the host.
# Estimates, not measurements: `kubectl top pod` under load says what to set.
GIB = 1024**3
MIB = 1024**2
SERVER_MEMORY = {False: 1 * GIB, True: 2 * GIB}
_LABELS = {"app.kubernetes.io/managed-by": "ats-deploy"}
_KEDA_DOCS = "https://kserve.github.io/website/docs/model-serving/predictive-inference/autoscaling/keda-autoscaler"


@dataclass(frozen=True)
class Options:
    """The command line's choices for the deployment."""

    name: str | None = None  # the InferenceService's name; None: from the Triton model's
    storage_uri: str | None = None  # where the repository is uploaded; None: a PersistentVolumeClaim NAME-repository
    min_replicas: int = 1
    max_replicas: int = 4


@dataclass(frozen=True)
class Deployment:
    """What :func:`prepare` built and checked: the folder to write and what it holds."""

    folder: Path
    files: dict[str, str]  # path in the folder -> text
    name: str  # the InferenceService's
    storage_uri: str
    entry_model: str  # the Triton model clients call
    triton_release: str | None  # the pinned container release, for an engine
    checked_against: tuple[str, ...]


def folder_for(repository: Path) -> Path:
    """``REPO-kserve`` beside the repository ``REPO``."""
    repository = Path(repository)
    base = repository if repository.name else repository.resolve()
    return base.with_name(base.name + SUFFIX)


def default_name(model_name: str) -> str:
    """A Kubernetes name from a Triton model name: lower case, other characters as '-', starting with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower())
    name = re.sub(r"^[^a-z]+", "", name)[:MAX_NAME].rstrip("-")
    return name or "model"


def check_name(name: str) -> str:
    """``name`` if KServe accepts it for an InferenceService (and so Triton for a model)."""
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise UserError(
            f"'{name}' cannot name an InferenceService: use at most {MAX_NAME} lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit (RFC 1035; KServe appends "
            f"'{PREDICTOR}').",
            hint=f"With --kserve, --name names the InferenceService and the Triton model: for example --name "
            f"{default_name(name)}.",
        )
    return name


def check_storage_uri(uri: str) -> str:
    """``uri`` if it is a URI KServe's storage initializer can download a repository from."""
    parts = urlsplit(uri)
    schemes = ", ".join(f"{scheme}://" for scheme in STORAGE)
    hint = "Upload the repository and pass where, for example --storage-uri s3://my-bucket/models/deit."
    if parts.scheme not in STORAGE or not parts.netloc or any(c.isspace() for c in uri):
        raise UserError(f"--storage-uri '{uri}' is not a storage URI KServe can download a model repository from "
                        f"({schemes} followed by a bucket, claim or host and a path).", hint=hint)
    if parts.scheme == "pvc" and not _CLAIM.fullmatch(parts.netloc):
        raise UserError(f"--storage-uri '{uri}' does not name a PersistentVolumeClaim: '{parts.netloc}' is not a "
                        "Kubernetes name (lower-case letters, digits, '-' and '.').",
                        hint="For example --storage-uri pvc://model-repository/deit.")
    return uri


def check_replicas(low: int, high: int) -> None:
    """Refuse a replica range whose minimum is above its maximum."""
    if low > high:
        raise UserError(f"--min-replicas {low} is above --max-replicas {high}.",
                        hint=f"Use --max-replicas {low} or more, or a smaller --min-replicas.")


def check_options(options: Options) -> Options:
    """``options`` if each is valid: the name, the storage URI and the replica range (nothing read or written)."""
    if options.name is not None:
        check_name(options.name)
    if options.storage_uri is not None:
        check_storage_uri(options.storage_uri)
    check_replicas(options.min_replicas, options.max_replicas)
    return options


def plan(model: Path, profile: Profile, repository: Path, options: Options, front: bool = False,
         allow_failed: bool = False) -> Deployment:
    """Everything ``--kserve`` writes for ``model``, checked before the repository itself is written.

    ``front``: the repository holds a front model under the name clients call and the model under
    ``NAME_inner`` (``--slo-ms``); the front model adapts keep within each replica, the HPA adds replicas.
    ``allow_failed``: as for the repository, a model whose validation failed is deployed anyway.
    """
    check_options(options)
    entry = repo.default_name(Path(model)) if options.name is None else options.name
    planned = repo.plan(model, profile, repository, entry + INNER_SUFFIX if front else entry, allow_failed)
    return prepare(planned, profile, options, entry if front else None)


def prepare(repository: repo.Repository, profile: Profile, options: Options,
            entry_model: str | None = None) -> Deployment:
    """Build and check the objects deploying ``repository`` (planned or written); nothing is written.

    ``entry_model`` is the model clients call, when it is not the repository's model itself (a front model).
    """
    check_options(options)
    source, config = repository.source, repository.config
    if not config.max_batch_size:
        raise UserError(
            f"{source.path} is a static export (batch {source.artifact.batch}, no keep input): Triton cannot batch "
            "its requests, so queue time does not measure load and replicas cannot follow it.",
            hint="Export with --dynamic (`ats-deploy export CHECKPOINT --dynamic`) to deploy on KServe.",
        )
    folder = folder_for(repository.folder.parent)
    if folder.exists():
        raise UserError(f"{folder} already exists: its objects may be applied on a cluster.",
                        hint="Remove it first, or write the repository elsewhere with -o.")
    name = options.name or default_name(entry_model or config.name)
    storage_uri = options.storage_uri or f"pvc://{name}-repository"
    release = release_for(source.tensorrt_version, str(source.path)) if source.is_engine else None
    runtime = _serving_runtime(release) if release else None
    service = _inference_service(repository, profile, options, name, storage_uri, runtime)
    # What the replicas follow, on which model: the queue of the model that batches; with a front model, also how
    # far it lowered keep.
    target = queue_target_us(config.dynamic_batching.max_queue_delay_microseconds)
    metrics = [(QUEUE_TIME, config.name, str(target))] + ([(KEEP_RUNG, entry_model, RUNG_TARGET)] if entry_model
                                                          else [])
    hpa = _hpa(options, name, metrics)
    signals = tuple(signal for signal, _, _ in metrics)
    objects = {SERVICE_FILE: service, HPA_FILE: hpa} | ({RUNTIME_FILE: runtime} if runtime else {})
    checked = tuple(dict.fromkeys(k8s_check.check(obj) for obj in objects.values()))
    files = {path: _render(obj, _header(path, repository, release, entry_model)) for path, obj in objects.items()}
    files[ADAPTER_FILE] = _render(_adapter_values(signals), _adapter_header(signals))
    return Deployment(folder, dict(sorted(files.items())), name, storage_uri, entry_model or config.name, release,
                      checked)


def write(deployment: Deployment) -> Path:
    """Write the deployment's folder atomically (built beside its place, renamed in when complete)."""
    try:
        write_folder(deployment.folder, deployment.files)
    except FileExistsError:
        raise UserError(f"{deployment.folder} already exists.", hint="Remove it first.") from None
    except OSError as exc:
        raise cannot_write(deployment.folder, exc) from None
    return deployment.folder


def upload_hint(storage_uri: str, repository: Path) -> str:
    """How to put the repository where ``storage_uri`` points."""
    return STORAGE[urlsplit(storage_uri).scheme].format(repo=repository, uri=storage_uri)


def queue_target_us(max_queue_delay_us: int) -> int:
    """The HPA's target mean queue time per request: the batcher's own delay plus :data:`BUSY_WAIT_US`."""
    return max_queue_delay_us + BUSY_WAIT_US


def resources(repository: repo.Repository, profile: Profile) -> dict:
    """Requests and limits (equal: Guaranteed QoS, whole CPUs the kubelet can pin) from the profile and model size.

    CPU: one core per onnxruntime thread of each instance on a CPU; on a GPU, one per instance plus one for the
    server's front end, and the GPU itself.
    """
    gpu = repository.on_gpu
    instances = sum(group.count for group in repository.config.instance_group)
    size = repository.source.path.stat().st_size
    cpus = instances + 1 if gpu else instances * (profile.threads or 1)
    memory = SERVER_MEMORY[gpu] + 2 * instances * size
    amounts = {"cpu": str(cpus), "memory": f"{math.ceil(memory / MIB)}Mi"} | ({"nvidia.com/gpu": "1"} if gpu else {})
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _serving_runtime(release: str) -> dict:
    """KServe's ``kserve-tritonserver`` runtime with its image pinned to ``release``; chosen by name, never auto."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": runtime_name(release), "labels": dict(_LABELS),
                     "annotations": {"serving.kserve.io/server-type": "tritonserver"}},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": "8002", "prometheus.kserve.io/path": "/metrics"},
            # autoSelect off: other InferenceServices of the namespace keep the runtime they would get.
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [{
                "name": "kserve-container",
                "image": IMAGE.format(release=release),
                "args": ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080",
                         "--allow-grpc=true", "--allow-http=true"],
                "securityContext": {"runAsUser": 1000, "allowPrivilegeEscalation": False, "privileged": False,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def runtime_name(release: str) -> str:
    """``tritonserver-25-01``: a ServingRuntime per release, so engines of several TensorRT versions coexist."""
    return "tritonserver-" + release.replace(".", "-")


def _inference_service(repository: repo.Repository, profile: Profile, options: Options, name: str, storage_uri: str,
                       runtime: dict | None) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "labels": dict(_LABELS),
            "annotations": {
                "serving.kserve.io/deploymentMode": "Standard",
                "serving.kserve.io/autoscalerClass": "external",
                "serving.kserve.io/enable-prometheus-scraping": "true",
            },
        },
        "spec": {"predictor": {
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "scaleMetric": "cpu",
            "scaleTarget": 80,
            "model": {
                "modelFormat": {"name": "triton"},
                "protocolVersion": "v2",
                "runtime": runtime["metadata"]["name"] if runtime else BUILT_IN_RUNTIME,
                "storageUri": storage_uri,
                "resources": resources(repository, profile),
            },
        }},
    }


def _hpa(options: Options, name: str, metrics: list[tuple[Signal, str, str]]) -> dict:
    """The HPA of the predictor on each (signal, Triton model, target); it takes the most replicas any asks for."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{name}-autoscaler", "labels": dict(_LABELS)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name + PREDICTOR},
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [_pods_metric(*metric) for metric in metrics],
            "behavior": BEHAVIOR,
        },
    }


def _pods_metric(signal: Signal, model: str, target: str) -> dict:
    selector = {"matchLabels": {"model": model}}  # Triton labels each model's metrics with its name
    return {"type": "Pods", "pods": {"metric": {"name": signal.name, "selector": selector},
                                     "target": {"type": "AverageValue", "averageValue": target}}}


def _adapter_values(signals: tuple[Signal, ...]) -> dict:
    """prometheus-adapter's Helm values: a rule per signal, serving it as a pods metric of the custom metrics API."""
    return {"rules": {"custom": [{
        "seriesQuery": f'{signal.series}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{signal.series}$", "as": signal.name},
        "metricsQuery": signal.query,
    } for signal in signals]}}


def _render(obj: dict, header: str) -> str:
    """The object as YAML after ``header`` as comments, each of its lines a paragraph wrapped at 110 columns."""
    body = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=1000)
    lines = [line for paragraph in header.strip().splitlines()
             for line in textwrap.wrap(paragraph, 110, break_long_words=False, break_on_hyphens=False)]
    return "".join(f"# {line}\n" for line in lines) + body


def _header(path: str, repository: repo.Repository, release: str | None, entry_model: str | None) -> str:
    config = repository.config
    if path == RUNTIME_FILE:
        return (f"Triton {release} (nvcr.io/nvidia/tritonserver:{release}-py3): the release whose TensorRT "
                f"({repository.source.tensorrt_version}) built {repository.source.path.name}; an engine loads only "
                "in the TensorRT that built it.\nKServe's built-in kserve-tritonserver runtime with this image: "
                "HTTP 8080, gRPC 9000, Prometheus metrics 8002.")
    if path == SERVICE_FILE:
        runtime = f"the ServingRuntime {runtime_name(release)} ({RUNTIME_FILE})" if release else (
            f"KServe's built-in {BUILT_IN_RUNTIME} runtime (the Triton image the cluster configured for it)")
        front = f"\nClients call the model '{entry_model}', which calls '{config.name}'." if entry_model else ""
        return (f"Serves the Triton model repository (model '{config.name}') with {runtime}.{front}\n"
                "Standard mode (KServe >= 0.16; 'RawDeployment' before): a plain Deployment NAME-predictor, no "
                "Knative, whose autoscaler would fight an HPA.\nautoscalerClass external: KServe creates no HPA; "
                f"{HPA_FILE} scales on queue time. scaleMetric/scaleTarget are read only with autoscalerClass hpa, "
                "the fallback without prometheus-adapter (set it and delete the HPA).\nResources: estimates from "
                "the profile (threads, instances) and the model's size; measure with `kubectl top pod` under load.")
    if path == HPA_FILE:
        rung = (f"\nWith the front model '{entry_model}': also on {KEEP_RUNG.meaning}, target {RUNG_TARGET} (half a "
                "rung): the front model holds the latency within milliseconds by lowering keep, and the replicas it "
                "would need at full keep follow within minutes.") if entry_model else ""
        return (f"Scales the replicas on {QUEUE_TIME.meaning} of '{config.name}': target "
                f"{config.dynamic_batching.max_queue_delay_microseconds} us (the batcher's own delay) + "
                f"{BUSY_WAIT_US} us of waiting for a free instance.{rung}\nNeeds prometheus-adapter with the rules "
                f"in {ADAPTER_FILE}, and Prometheus scraping the pods' port 8002 (the enable-prometheus-scraping "
                "annotation of the InferenceService).\nHPA, not KEDA: built into the cluster, its behavior states "
                "how fast pods come and go, and no scale to zero (a pod needs minutes to load its model). KServe's "
                f"own KEDA integration (autoscalerClass keda) takes the same queries: {_KEDA_DOCS}.")
    raise KeyError(path)


def _adapter_header(signals: tuple[Signal, ...]) -> str:
    served = "; ".join(f"{signal.name}: {signal.meaning}" for signal in signals)
    return (f"prometheus-adapter Helm values (merge into yours; helm upgrade --install prometheus-adapter "
            f"prometheus-community/prometheus-adapter -f values.yaml) serving {HPA_FILE}'s metrics per pod: "
            f"{served}.\nThe series must carry the pod's namespace and pod labels (rename them in the overrides "
            "where your scrape config calls them otherwise, e.g. kubernetes_pod_name).\nNot a Kubernetes object: "
            "`kubectl apply -f` on the folder above does not read this subfolder.")
