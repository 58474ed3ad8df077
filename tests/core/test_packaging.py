"""The built wheel works on its own: one import namespace, profiles as package data, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO as ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (out / "build.log").write_text(built.stdout + built.stderr)  # for test_the_build_uses_no_deprecated_metadata
    return next(out.glob("ats_deploy-*.whl"))


def test_the_build_uses_no_deprecated_metadata(wheel):
    """pip and setuptools warned that the `license` table is deprecated (PEP 639: an SPDX string)."""
    log = (wheel.parent / "build.log").read_text()
    assert "deprecated" not in log.lower(), log
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.decode()


def test_wheel_claims_only_ats_deploy(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ats_deploy"}
    for expected in (
        "ats_deploy/exporters/onnx_export.py",
        "ats_deploy/exporters/tensorrt/build.py",
        "ats_deploy/exporters/precisions/fp16.py",
        "ats_deploy/bench/__init__.py",
        "ats_deploy/profiles/jetson.yaml",
        "ats_deploy/profiles/cpu.yaml",
        "ats_deploy/serving/kserve_schemas/inferenceservices.v1beta1.json.gz",
        "ats_deploy/serving/kserve_schemas/servingruntimes.v1alpha1.json.gz",
        "ats_deploy/serving/kserve_schemas/LICENSE",
    ):
        assert expected in names


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True)
    # Dependencies come from the dev environment's site-packages; its editable install of
    # ats_deploy is a .pth hook, which PYTHONPATH entries do not run.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    code = (
        "import ats_deploy, ats_deploy.exporters.onnx_export, ats_deploy.exporters.tensorrt.build, ats_deploy.bench;"
        "from ats_deploy.profiles import load_profile;"
        "from ats_deploy.serving.k8s_check import vendored_schema;"
        "assert vendored_schema('serving.kserve.io/v1beta1', 'InferenceService')['type'] == 'object';"
        "print(ats_deploy.__file__, load_profile('jetson').backend)"
    )
    # From a neutral folder: in the repository root, "import ats_deploy" would find the sources.
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = result.stdout
    assert shown.startswith(str(venv)) and shown.strip().endswith("tensorrt")
    help_text = subprocess.run(
        [venv / "bin" / "ats-deploy", "--help"], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    ).stdout
    assert "export" in help_text and "bench" in help_text
    site = Path(shown.split()[0]).parents[1]
    assert not (site / "bench").exists() and not (site / "exporters").exists()
