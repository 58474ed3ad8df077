"""``ats-deploy triton --kserve``: KServe and Kubernetes objects that pass their own schemas, offline.

The engine is a stand-in (bytes plus the ``<engine>.json`` ``ats-deploy build`` writes): the
deployment is built from its metadata, and no cluster, TensorRT or GPU is needed here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cli_helpers import invoke, plain
from conftest import SHARED
from test_triton_repository import fake_engine, static_copy

from ats_deploy.artifact import engine_info_path
from ats_deploy.atomic import write_folder
from ats_deploy.errors import UserError
from ats_deploy.profiles import load_profile
from ats_deploy.serving import front_model, k8s_check, kserve, repository
from ats_deploy.serving.k8s_check import InvalidObject
from ats_deploy.serving.triton_releases import known_release

SHARED_KSERVE = SHARED / "schemas" / "kserve"
needs_shared = pytest.mark.skipif(not SHARED_KSERVE.is_dir(), reason=f"KServe's CRDs not found at {SHARED_KSERVE} "
                                  "(they ship in ../shared/schemas/kserve)")
GPU = "nvidia.com/gpu"


def objects(deployment: kserve.Deployment) -> dict[str, dict]:
    """The YAML files of ``deployment`` parsed back: what a user applies, comments and all."""
    return {path: yaml.safe_load(text) for path, text in deployment.files.items()}


@pytest.fixture(scope="module")
def cpu(tiny_ats_onnx, tmp_path_factory) -> kserve.Deployment:
    repo = tmp_path_factory.mktemp("cpu") / "repo"
    return kserve.plan(tiny_ats_onnx, load_profile("cpu"), repo, kserve.Options(storage_uri="s3://bucket/deit"))


@pytest.fixture(scope="module")
def gpu(tiny_ats_onnx, tmp_path_factory) -> kserve.Deployment:
    folder = tmp_path_factory.mktemp("gpu")
    engine = fake_engine(folder, tiny_ats_onnx, [1, 32, 64])  # built with TensorRT 10.8.0.43
    return kserve.plan(engine, load_profile("server-gpu"), folder / "repo", kserve.Options(min_replicas=2,
                                                                                        max_replicas=6))


def test_a_cpu_profile_deploys_the_onnx_model_in_kserves_triton_runtime(cpu, tiny_ats_onnx):
    files = objects(cpu)
    assert set(files) == {kserve.SERVICE_FILE, kserve.HPA_FILE, kserve.ADAPTER_FILE}  # no runtime of its own
    for path in (kserve.SERVICE_FILE, kserve.HPA_FILE):
        k8s_check.check(files[path])  # the text as written passes, not only the dict it came from
    service, hpa = files[kserve.SERVICE_FILE], files[kserve.HPA_FILE]
    profile = load_profile("cpu")
    serving = profile.serving_settings()
    assert cpu.name == service["metadata"]["name"] == "deit-tiny-patch16-224-ats"
    assert cpu.entry_model == "deit_tiny_patch16_224_ats"  # the Triton model keeps its name
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == kserve.BUILT_IN_RUNTIME and model["modelFormat"] == {"name": "triton"}
    assert model["storageUri"] == "s3://bucket/deit"
    # threads x instances cores; the server plus two copies of the model per instance; no GPU
    memory = kserve.SERVER_MEMORY[False] + 2 * serving.instances * tiny_ats_onnx.stat().st_size
    assert model["resources"]["limits"] == model["resources"]["requests"] == {
        "cpu": str(profile.threads * serving.instances), "memory": f"{-(-memory // kserve.MIB)}Mi"}
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # the HPA below, not KServe's
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{cpu.name}-predictor"
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"] == {"name": kserve.QUEUE_TIME.name,
                                "selector": {"matchLabels": {"model": cpu.entry_model}}}
    assert len(hpa["spec"]["metrics"]) == 1
    assert metric["target"]["averageValue"] == str(serving.max_queue_delay_us + kserve.BUSY_WAIT_US)
    [rule] = files[kserve.ADAPTER_FILE]["rules"]["custom"]
    assert rule["name"]["as"] == kserve.QUEUE_TIME.name
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>}" in rule["metricsQuery"]
    assert "nv_inference_request_success{<<.LabelMatchers>>}" in rule["metricsQuery"]


def test_an_engine_gets_a_runtime_pinned_to_the_triton_release_of_its_tensorrt(gpu):
    files = objects(gpu)
    for path in (kserve.RUNTIME_FILE, kserve.SERVICE_FILE, kserve.HPA_FILE):
        k8s_check.check(files[path])
    runtime, service, hpa = files[kserve.RUNTIME_FILE], files[kserve.SERVICE_FILE], files[kserve.HPA_FILE]
    assert gpu.triton_release == "25.01"  # TensorRT 10.8.0.43
    assert runtime["spec"]["containers"][0]["image"] == "nvcr.io/nvidia/tritonserver:25.01-py3"
    assert runtime["spec"]["supportedModelFormats"] == [{"name": "triton", "version": "2", "autoSelect": False}]
    assert "Triton 25.01" in gpu.files[kserve.RUNTIME_FILE] and "10.8.0.43" in gpu.files[kserve.RUNTIME_FILE]
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"] == "tritonserver-25-01"
    assert predictor["model"]["storageUri"] == f"pvc://{gpu.name}-repository"
    limits = predictor["model"]["resources"]["limits"]
    assert limits[GPU] == "1" and limits["cpu"] == str(load_profile("server-gpu").serving_settings().instances + 1)
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 6)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)


def test_with_a_front_model_replicas_also_follow_how_far_it_lowered_keep(tiny_ats_onnx, tmp_path):
    deployment = kserve.plan(tiny_ats_onnx, load_profile("cpu"), tmp_path / "repo", kserve.Options(name="deit"),
                             front=True)  # --slo-ms: the front model is 'deit', the model 'deit_inner'
    files = objects(deployment)
    k8s_check.check(files[kserve.HPA_FILE])
    assert deployment.entry_model == "deit" and files[kserve.SERVICE_FILE]["metadata"]["name"] == "deit"
    queue, rung = (m["pods"] for m in files[kserve.HPA_FILE]["spec"]["metrics"])
    assert queue["metric"]["name"] == kserve.QUEUE_TIME.name and queue["metric"]["selector"]["matchLabels"] == {
        "model": "deit_inner"}  # the model that batches
    assert rung["metric"] == {"name": kserve.KEEP_RUNG.name, "selector": {"matchLabels": {"model": "deit"}}}
    assert rung["target"] == {"type": "AverageValue", "averageValue": kserve.RUNG_TARGET}
    rules = files[kserve.ADAPTER_FILE]["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [kserve.QUEUE_TIME.name, kserve.KEEP_RUNG.name]
    assert "within milliseconds" in deployment.files[kserve.HPA_FILE]  # the two loops, in the file itself


def test_the_front_model_exports_the_gauge_the_hpa_scales_on():
    names: list[str] = []

    class Family:
        GAUGE, COUNTER = "gauge", "counter"

        def __init__(self, name: str, description: str, kind: str) -> None:
            names.append(name)

        def Metric(self, labels: dict) -> None:  # Triton's name for it
            assert labels["model"] == "deit"

    front_model._Metrics(SimpleNamespace(MetricFamily=Family), "deit")
    assert kserve.KEEP_RUNG.series in names


@pytest.mark.parametrize(("path", "where", "change", "message"), [
    (kserve.SERVICE_FILE, ["spec", "predictor"], {"minReplica": 1}, r"spec\.predictor: .*'minReplica' was unexpected"),
    (kserve.SERVICE_FILE, ["spec", "predictor"], {"maxReplicas": "four"}, r"spec\.predictor\.maxReplicas: .*integer"),
    (kserve.SERVICE_FILE, ["spec", "predictor"], {"scaleMetric": "gpu"}, r"spec\.predictor\.scaleMetric: 'gpu'"),
    (kserve.SERVICE_FILE, ["spec", "predictor", "model", "resources", "limits"], {"memory": "lots"},
     r"resources\.limits\.memory"),
    (kserve.RUNTIME_FILE, ["spec", "containers", 0], {"imge": "triton"}, r"spec\.containers\[0\]: .*'imge'"),
    (kserve.RUNTIME_FILE, ["spec"], {"protocolVersions": "v2"}, r"spec\.protocolVersions: 'v2' is not of type"),
    (kserve.HPA_FILE, ["spec"], {"maxReplica": 4}, r"spec: .*'maxReplica' was unexpected"),
    (kserve.HPA_FILE, ["spec", "metrics", 0, "pods", "target"], {"averageValue": [1]},
     r"spec\.metrics\[0\]\.pods\.target\.averageValue"),
])
def test_a_broken_field_of_each_kind_of_object_fails_its_schema(gpu, path, where, change, message):
    broken = copy.deepcopy(objects(gpu)[path])
    node = broken
    for key in where:
        node = node[key]
    node.update(change)
    with pytest.raises(InvalidObject, match=message) as caught:
        k8s_check.check(broken)
    assert "nothing was written" in caught.value.message


@pytest.mark.parametrize(("version", "message"), [("10.12.0.30", r"TensorRT 10\.12\.0\.30, which no Triton release"),
                                                  (None, r"does not record which TensorRT")])
def test_an_engine_of_a_tensorrt_the_table_does_not_know_is_refused(tiny_ats_onnx, tmp_path, version, message):
    engine = fake_engine(tmp_path, tiny_ats_onnx, [1, 32, 64])
    sidecar = engine_info_path(engine)
    info = json.loads(sidecar.read_text())
    info["tensorrt_version"] = version
    sidecar.write_text(json.dumps(info))
    with pytest.raises(UserError, match=message) as caught:
        kserve.plan(engine, load_profile("server-gpu"), tmp_path / "repo", kserve.Options())
    assert "10.8.0 (25.01)" in caught.value.hint  # the versions it knows
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo-kserve").exists()


@needs_shared
@pytest.mark.parametrize(("source", "version", "kind"), [
    ("serving.kserve.io_inferenceservices.yaml", "v1beta1", ("serving.kserve.io/v1beta1", "InferenceService")),
    ("serving.kserve.io_servingruntimes.yaml", "v1alpha1", ("serving.kserve.io/v1alpha1", "ServingRuntime")),
])
def test_the_vendored_schemas_are_kserves_own_crds_trimmed(source, version, kind):
    crd = yaml.load((SHARED_KSERVE / source).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB
    assert k8s_check.vendored_schema(*kind) == k8s_check.trim_crd(crd, version)


@needs_shared
def test_the_pinned_runtime_is_kserves_built_in_triton_runtime_with_another_image(gpu):
    built_in = yaml.safe_load((SHARED_KSERVE / "kserve-tritonserver.yaml").read_text())["spec"]
    pinned = objects(gpu)[kserve.RUNTIME_FILE]["spec"]
    assert pinned["protocolVersions"] == built_in["protocolVersions"]
    assert pinned["annotations"] == built_in["annotations"]  # where Prometheus scrapes Triton's metrics
    ours, theirs = pinned["containers"][0], built_in["containers"][0]
    assert {key: ours[key] for key in ("name", "args", "securityContext")} == {
        key: theirs[key] for key in ("name", "args", "securityContext")}
    # and the ONNX models' runtime is named as KServe names its own
    assert yaml.safe_load((SHARED_KSERVE / "kserve-tritonserver.yaml").read_text())["metadata"]["name"] == (
        kserve.BUILT_IN_RUNTIME)


def test_the_cli_writes_the_repository_and_the_kserve_folder_and_says_how_to_deploy(exported, here):
    result = invoke("triton", exported, "--profile", "cpu", "-o", "repo", "--kserve", "--name", "deit",
                    "--storage-uri", "s3://bucket/models/deit", "--min-replicas", "2", "--max-replicas", "8")
    assert result.exit_code == 0, result.output
    out = plain(result.output)
    assert (here / "repo/deit/config.pbtxt").is_file()
    written = sorted(str(p.relative_to(here / "repo-kserve")) for p in (here / "repo-kserve").rglob("*.yaml"))
    assert written == [kserve.SERVICE_FILE, kserve.HPA_FILE, kserve.ADAPTER_FILE]
    service = yaml.safe_load((here / "repo-kserve" / kserve.SERVICE_FILE).read_text())
    assert service["metadata"]["name"] == "deit" and service["spec"]["predictor"]["maxReplicas"] == 8
    assert "aws s3 sync repo s3://bucket/models/deit" in out
    assert "kubectl apply -f repo-kserve" in out
    assert "ats-deploy loadtest localhost:8000 --model-name deit" in out
    assert "checked against KServe's CRD schema and the Kubernetes" in out
    assert sorted(p.name for p in here.iterdir()) == sorted([exported.name, "repo", "repo-kserve"])  # no staging


def test_the_cli_names_the_triton_release_of_an_engine(tiny_ats_onnx, here):
    engine = fake_engine(here, tiny_ats_onnx, [1, 32, 64])  # TensorRT 10.8.0.43
    result = invoke("triton", engine, "--profile", "server-gpu", "-o", "repo", "--kserve")
    assert result.exit_code == 0, result.output
    out = plain(result.output)
    assert "TensorRT 10.8.0.43: Triton 25.01 ships it" in out
    assert "nvcr.io/nvidia/tritonserver:25.01-py3 tritonserver --model-repository=/models" in out  # docker run
    assert "the engine runs in Triton 25.01" in out
    assert (here / "repo-kserve" / kserve.RUNTIME_FILE).is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "Deit_Tiny"], "'Deit_Tiny' cannot name an InferenceService"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is above --max-replicas 2"),
    (["--storage-uri", "models/deit"], "'models/deit' is not a storage URI"),
    (["--storage-uri", "s3:/bucket/deit"], "'s3:/bucket/deit' is not a storage URI"),
    (["--storage-uri", "pvc://Models_PVC/deit"], "does not name a PersistentVolumeClaim"),
])
def test_bad_kserve_input_is_one_message_and_nothing_is_written(exported, here, args, message):
    result = invoke("triton", exported, "--profile", "cpu", "-o", "repo", "--kserve", *args)
    assert result.exit_code == 2
    assert message in plain(result.output) and "Traceback" not in result.output
    assert sorted(p.name for p in here.iterdir()) == [exported.name]


def test_a_static_export_or_an_existing_kserve_folder_is_refused_before_anything_is_written(exported, here):
    static = static_copy(exported, here / "static.onnx")
    result = invoke("triton", static, "--profile", "cpu", "-o", "repo", "--kserve")
    assert result.exit_code == 2 and "is a static export" in plain(result.output)
    assert "--dynamic" in plain(result.output)
    (here / "repo-kserve").mkdir()
    result = invoke("triton", exported, "--profile", "cpu", "-o", "repo", "--kserve")
    assert result.exit_code == 2 and "repo-kserve already exists" in plain(result.output)
    assert sorted(p.name for p in here.iterdir()) == sorted([exported.name, "static.onnx", "repo-kserve"])
    assert not any((here / "repo-kserve").iterdir())


def test_names_for_kubernetes():
    assert kserve.default_name("deit.server-gpu") == "deit-server-gpu"
    assert kserve.default_name("3_DeiT__tiny_") == "deit-tiny"
    assert kserve.default_name("___") == "model"
    assert len(kserve.default_name("a" * 80)) == kserve.MAX_NAME
    for name in ("deit", "deit-tiny-2", "d" * kserve.MAX_NAME):
        assert kserve.check_name(name) == name
    for bad in ("2deit", "deit-", "deit.tiny", "Deit", "d" * (kserve.MAX_NAME + 1), ""):
        with pytest.raises(UserError):
            kserve.check_name(bad)
    assert kserve.folder_for(Path("out/repo")) == Path("out/repo-kserve")
    assert repository.default_name(Path("deit.server-gpu.plan")) == "deit.server-gpu"


def test_the_release_table_matches_tensorrt_on_major_minor_patch():
    assert known_release("10.8.0.43") == known_release("10.8.0") == "25.01"
    assert known_release("10.8") is None and known_release("10.12.0.36") is None and known_release(None) is None


def test_the_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(OSError):  # the second file cannot be written: a file stands where its folder would be
        write_folder(tmp_path / "out", {"a.yaml": "x", "a.yaml/b.yaml": "y"})
    assert list(tmp_path.iterdir()) == []  # no half folder, no staging folder
    write_folder(tmp_path / "out", {"sub/b.yaml": "y"})
    assert (tmp_path / "out/sub/b.yaml").read_text() == "y"
    with pytest.raises(FileExistsError):  # never merged into
        write_folder(tmp_path / "out", {"c.yaml": "z"})
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not (tmp_path / "out/c.yaml").exists()
