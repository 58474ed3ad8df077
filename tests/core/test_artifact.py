"""One schema for what an exported model says about itself (ats_deploy.artifact, docs/ATS.md section 5).

Export writes it, ``<engine>.json`` copies it, every reader parses it back the same
way, and a file that lacks it or garbles it is refused once, by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from cli_helpers import invoke, plain
from onnx import TensorProto, helper

from ats_deploy import runtime
from ats_deploy.artifact import (
    SIDECAR_KEY,
    Artifact,
    OutdatedInterface,
    Unreadable,
    maybe_of_onnx,
    read,
    read_engine,
    read_metadata,
    sidecar_metadata,
)
from ats_deploy.errors import UserError
from ats_deploy.images import data_config

NEW_KEYS = ("interface_version", "precision", "prefix_tokens")
FIX = "ats-deploy export CHECKPOINT --dynamic"


@pytest.fixture(scope="module")
def meta(tiny_ats_onnx) -> dict[str, str]:
    """The metadata_props of a real dynamic export, as the file holds them."""
    return read_metadata(onnx.load(str(tiny_ats_onnx), load_external_data=False))


def saved_without(source: Path, path: Path, keys: tuple[str, ...]) -> Path:
    """A copy of ``source`` whose metadata lacks ``keys`` (a file from before they existed)."""
    model = onnx.load(str(source), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in keys]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def saved_with(source: Path, path: Path, edits: dict[str, str]) -> Path:
    """A copy of ``source`` with ``edits`` written into its metadata."""
    model = onnx.load(str(source), load_external_data=False)
    for prop in model.metadata_props:
        prop.value = edits.get(prop.key, prop.value)
    onnx.save(model, str(path))
    return path


def plain_onnx(path: Path) -> Path:
    """A valid ONNX file that ats-deploy did not write (one Identity node, no metadata)."""
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [value], [out])
    model = helper.make_model(graph)
    model.metadata_props.add(key="stages", value="[3]")
    onnx.save(model, str(path))
    return path


def test_a_real_export_round_trips(tiny_ats_onnx, meta):
    from ats_deploy.checkpoints import load_model

    artifact = read(tiny_ats_onnx)
    assert artifact.to_metadata() == meta
    assert Artifact.from_metadata(meta, "x.onnx") == artifact
    assert (artifact.arch, artifact.stages, artifact.n0, artifact.num_classes) == (
        "deit_tiny_patch16_224", tuple(range(3, 12)), 197, 1000,
    )
    assert artifact.dynamic and artifact.batch is None and artifact.budget is None and artifact.ats_op == "subgraph"
    assert artifact.source_checkpoint == "random:0" and artifact.exporter == "torchscript"
    # spec section 4: the interface version, the precision and the prefix-token count are recorded
    assert {key: meta[key] for key in NEW_KEYS} == {"interface_version": "2", "precision": "fp32", "prefix_tokens": "1"}
    reference = load_model("random:0", arch="deit_tiny_patch16_224")
    expected = data_config(reference.vit)
    assert artifact.data_config == {key: expected[key] for key in artifact.data_config}


def test_a_static_artifact_round_trips_with_its_batch_and_budget(tiny_ats_onnx):
    static = dataclasses.replace(read(tiny_ats_onnx), dynamic=False, batch=2, keep=(0.6,) * 9, budget=(118,) * 9)
    props = static.to_metadata()
    assert props["dynamic"] == "false" and props["batch"] == "2" and json.loads(props["budget"]) == [118] * 9
    assert Artifact.from_metadata(props, "static.onnx") == static
    custom = dataclasses.replace(static, ats_op="custom")
    assert Artifact.from_metadata(custom.to_metadata(), "custom.onnx").ats_op == "custom"
    dense = dataclasses.replace(static, stages=(), keep=(), budget=())  # `convert --stages none`
    assert Artifact.from_metadata(dense.to_metadata(), "dense.onnx") == dense


def test_a_file_of_interface_version_1_is_refused_with_the_fix(tiny_ats_onnx, tmp_path):
    """Version 1 files take keep [S]: fed the [batch, S] rows of version 2, they would fail or mislead."""
    old = saved_without(tiny_ats_onnx, tmp_path / "old.onnx", NEW_KEYS)  # written before the keys existed: version 1
    assert not NEW_KEYS & read_metadata(onnx.load(str(old))).keys()
    explicit = saved_with(tiny_ats_onnx, tmp_path / "v1.onnx", {"interface_version": "1"})
    for path in (old, explicit):
        refused = r"has interface version 1; this ats-deploy runs version 2"
        with pytest.raises(OutdatedInterface, match=refused) as caught:
            read(path)
        assert "Re-export it from its checkpoint" in caught.value.hint
        with pytest.raises(OutdatedInterface):
            runtime.open(path, threads=1)
        with pytest.raises(OutdatedInterface):  # not mistaken for a foreign ONNX file by build and check
            maybe_of_onnx(onnx.load(str(path)))
    result = invoke("validate", explicit)
    assert result.exit_code == 2 and "interface version 1" in result.output and "Re-export" in result.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_classes": None}, "x.onnx was not exported by ats-deploy: its metadata lacks num_classes."),
        ({"arch": None, "crop_pct": None}, "its metadata lacks arch, crop_pct."),
        ({"dynamic": "false"}, "its metadata lacks batch, budget."),
        ({"stages": "[3, \"four\"]"}, "x.onnx has a bad 'stages' in its metadata: '[3, \"four\"]' is not a JSON list"),
        ({"keep": "[0.7, 0.7]"}, "bad 'keep' in its metadata: '[0.7, 0.7]' is not one value per stage (9)"),
        ({"dynamic": "yes"}, "bad 'dynamic' in its metadata: 'yes' is not true or false"),
        ({"n0": "197.5"}, "bad 'n0' in its metadata"),
        ({"interface_version": "two"}, "bad 'interface_version' in its metadata"),
    ],
)
def test_a_missing_or_bad_key_is_one_message_naming_it_and_the_fix(meta, edit, message):
    edited = {key: value for key, value in {**meta, **edit}.items() if value is not None}
    with pytest.raises(UserError) as caught:
        Artifact.from_metadata(edited, "x.onnx")
    assert message in caught.value.message
    assert FIX in caught.value.hint


def test_a_foreign_or_corrupt_file_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match=r"plain\.onnx was not exported by ats-deploy: its metadata lacks arch, n0"):
        read(plain_onnx(tmp_path / "plain.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx file at all\xff\xff")
    with pytest.raises(Unreadable, match=r"corrupt\.onnx is corrupt or not an ONNX file") as caught:
        read(corrupt)
    assert "Re-export it with `ats-deploy export CHECKPOINT --dynamic`" in caught.value.hint
    result = invoke("validate", corrupt)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "corrupt.onnx is corrupt or not an ONNX file" in plain(result.output)
    assert "not exported by ats-deploy" not in plain(result.output)


def test_the_engine_sidecar_round_trips(tiny_ats_onnx, tmp_path):
    recorded = sidecar_metadata(onnx.load(str(tiny_ats_onnx)))
    assert recorded == read(tiny_ats_onnx).to_metadata()
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    (tmp_path / "model.plan.json").write_text(json.dumps({SIDECAR_KEY: recorded, "precision": "fp16"}))
    artifact, info = read_engine(engine)
    assert artifact == read(tiny_ats_onnx) == read(engine)
    assert info["precision"] == "fp16" and artifact.precision == "fp32"  # the engine's build vs the exported file
    foreign = onnx.load(str(plain_onnx(tmp_path / "plain.onnx")))
    assert sidecar_metadata(foreign) == {"stages": "[3]"}  # build takes any ONNX file with the interface
    (tmp_path / "model.plan.json").write_text(json.dumps({SIDECAR_KEY: {**recorded, "interface_version": "1"}}))
    with pytest.raises(OutdatedInterface, match=r"engine .*model\.plan has interface version 1") as caught:
        read(engine)
    assert "rebuild the engine with `ats-deploy build`" in caught.value.hint


def test_an_engine_without_a_usable_sidecar_is_refused_by_name(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    with pytest.raises(UserError, match=r"model\.plan\.json is missing.*`ats-deploy build`") as caught:
        read(engine)
    assert "ats-deploy build MODEL.onnx --profile NAME" in caught.value.hint
    sidecar = tmp_path / "model.plan.json"
    for text in ("{not json", json.dumps({"tensorrt_version": "10.0"}), json.dumps({SIDECAR_KEY: ["arch"]})):
        sidecar.write_text(text)
        with pytest.raises(UserError, match=r"cannot read .*model\.plan\.json"):
            read(engine)
    sidecar.write_text(json.dumps({SIDECAR_KEY: {"stages": "[3]"}}))
    foreign = r"engine .*model\.plan was not exported by ats-deploy: its metadata lacks arch, n0"
    with pytest.raises(UserError, match=foreign):
        read(engine)
