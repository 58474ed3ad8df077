"""One verdict on an int8 export, wherever it is judged: export, validate, loadtest --verify (docs/ATS.md section 6).

By top-1 agreement against the bar on the precision's registry entry, decided by a bound that allows for the
number of images; calibration and validation images read like bench's (unreadable files skipped and counted);
a file that failed validation is marked, and triton, serve and build refuse it unless told otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from cli_helpers import invoke, plain
from rich.console import Console

from ats_deploy import precision as precisions
from ats_deploy.artifact import ALLOW_FAILED, mark_failed, read
from ats_deploy.checkpoints import load_model
from ats_deploy.errors import UserError
from ats_deploy.exporters import validate
from ats_deploy.exporters.compare import TopOneAgreement, top1_agreement
from ats_deploy.exporters.precisions import int8
from ats_deploy.images import data_config, sample_images

TINY = ("random:0", "--arch", "deit_tiny_patch16_224")
PHOTOS = len(sample_images())


@pytest.fixture(scope="module")
def reference():
    return load_model("random:0", arch="deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, photo_folder) -> Path:
    """`export --precision int8` of the tiny random DeiT, calibrated on the photos, not validated."""
    folder = tmp_path_factory.mktemp("int8-export")
    path = folder / "tiny.int8.onnx"
    result = invoke("export", *TINY, "--dynamic", "--precision", "int8", "--calibration", photo_folder,
                    "--calibration-images", PHOTOS, "--no-validate", "-o", path)
    assert result.exit_code == 0, result.output
    return path


def test_the_bar_is_the_registry_entry_and_the_bound_allows_for_few_images():
    entry = precisions.get("int8")
    assert entry.required([[1.0] * 3]) == entry.min_top1_agreement == 0.8
    assert entry.required([[1.0] * 3, [0.5] * 3]) == entry.min_top1_agreement_sampled == 0.6
    assert precisions.get("fp32").exact and not entry.exact
    assert top1_agreement(entry, [[1.0]], 3, 4).ok, "3 of 4 is no evidence against an 80% bar"
    assert not top1_agreement(entry, [[1.0]], 26, 40).ok, "26 of 40 is"
    assert not top1_agreement(entry, [[1.0]], 0, 4).ok, "a broken file fails even on 4 images"
    assert top1_agreement(entry, [[0.5]], 26, 40).ok, "the sampled bar is lower"
    text = TopOneAgreement(3, 4, 0.8).describe()
    assert "3/4 = 75.0%" in text and "95% upper bound" in text and "within sampling error of the 80% bar" in text


def test_validate_judges_an_int8_export_by_agreement_and_passes_it(int8_export):
    result = invoke("validate", int8_export, "--keep", "1.0", "--keep", "0.5", "--batch", "4")
    text = plain(result.output)
    assert result.exit_code == 0, result.output
    assert "judged by top-1 agreement" in text and "upper bound" in text
    assert "matches the PyTorch reference" in text
    assert not read(int8_export).validation_failed


def test_an_export_calibrated_on_every_image_says_how_few_are_left_and_decides_by_the_bound(
    reference, photo_folder
):
    console = Console(record=True, width=200)
    calibration = int8.Calibration(photo_folder, images=PHOTOS)
    names, images = validate.held_out_inputs(reference, calibration, None, console)
    text = console.export_text()
    assert len(names) == PHOTOS == len(images)
    assert "the calibration folder has no image left over" in text
    assert f"only {PHOTOS} held-out images" in text and "95% upper bound" in text


def test_validation_data_gives_the_held_out_set(reference, photo_folder, tmp_path):
    console = Console(record=True, width=200)
    data = tmp_path / "held"
    shutil.copytree(photo_folder, data)
    names, _ = validate.held_out_inputs(reference, int8.Calibration(photo_folder, 2), data, console, 3)
    assert len(names) == 3 and f"--validation-data {data}" in console.export_text()


def test_loadtest_verify_judges_int8_answers_by_agreement(int8_export, reference):
    """Answers as the served int8 file gives them, compared as export judges them (before: exact, so FAIL)."""
    from ats_deploy.backends.onnxruntime.session import session
    from ats_deploy.images import preprocess
    from ats_deploy.serving.loadtest.verify import verify

    pixels = preprocess(list(sample_images().values()), data_config(reference.vit)).numpy()
    keep = np.full((2, len(reference.stages)), 0.7, np.float32)
    run = session(int8_export)
    answers = []
    for index, start in enumerate(range(0, PHOTOS, 2)):
        logits, tokens = run.run(["logits", "tokens"], {"images": pixels[start : start + 2], "keep": keep})
        answers.append(SimpleNamespace(index=index, keep=0, images=np.arange(start, start + 2), logits=logits,
                                       tokens=tokens))
    target = SimpleNamespace(default_keep=[0.7] * len(reference.stages), artifact=read(int8_export))
    sender = SimpleNamespace(target=target, batch=2, mix=SimpleNamespace(rows=[[0.7] * len(reference.stages)]),
                             images=SimpleNamespace(pixels=pixels, names=list(sample_images())))
    verification = verify(answers, PHOTOS, reference, sender)
    assert verification.ok, [c.problems for c in verification.cases]
    case = verification.cases[0]
    assert case.images == PHOTOS and case.agreement is not None and case.agreement.bar == 0.6


def test_calibration_skips_and_counts_unreadable_images(reference, photo_folder, tmp_path):
    folder = tmp_path / "calibration"
    shutil.copytree(photo_folder, folder)
    (folder / "aaa-broken.jpg").write_bytes(b"not an image")
    config = data_config(reference.vit)
    found = int8.read_calibration(int8.Calibration(folder, images=PHOTOS), reference.num_classes, config)
    assert len(found.pixels) == PHOTOS and found.rest == []
    assert [name for name, _ in found.skipped] == ["aaa-broken.jpg"]
    assert "1 unreadable file(s) skipped" in found.describe()
    with pytest.raises(UserError, match=rf"holds {PHOTOS} readable image\(s\) \(1 unreadable file\(s\) skipped"):
        int8.read_calibration(int8.Calibration(folder, images=PHOTOS + 1), reference.num_classes, config)


# --------------------------------------------------------------------------- a failed file is marked and refused


@pytest.fixture
def failed(tiny_ats_onnx, tmp_path) -> Path:
    path = tmp_path / "failed.onnx"
    shutil.copy(tiny_ats_onnx, path)
    mark_failed(path, "2 mismatch(es); the first: block 3 kept 40 patches, the reference 41")
    return path


def test_a_marked_file_keeps_its_graph_and_says_why(failed, tiny_ats_onnx):
    assert "block 3 kept 40 patches" in read(failed).validation_failed
    assert not read(tiny_ats_onnx).validation_failed
    assert onnx.load(str(failed)).graph == onnx.load(str(tiny_ats_onnx)).graph


def test_triton_refuses_a_failed_file_unless_allowed(failed, here):
    refused = invoke("triton", failed, "--profile", "cpu", "-o", "repo")
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    text = plain(refused.output)
    assert "failed validation against the PyTorch reference" in text and ALLOW_FAILED in text
    assert not (here / "repo").exists()
    allowed = invoke("triton", failed, "--profile", "cpu", "-o", "repo", ALLOW_FAILED)
    assert allowed.exit_code == 0, allowed.output


def test_serve_and_build_refuse_a_failed_file(failed):
    from ats_deploy.exporters.tensorrt.plan import spec_from
    from ats_deploy.profiles import load_profile
    from ats_deploy.serving.server import Ports, plan

    with pytest.raises(UserError, match="failed validation") as refused:
        plan(failed, "cpu", Ports(21001, 21002, 21003))
    assert ALLOW_FAILED in refused.value.hint
    with pytest.raises(UserError, match="failed validation"):
        spec_from(failed, load_profile("desktop-gpu"))
    assert spec_from(failed, load_profile("desktop-gpu"), allow_failed=True).onnx == failed
    built = invoke("build", failed, "--profile", "desktop-gpu")
    assert built.exit_code != 0 and ALLOW_FAILED in plain(built.output)
