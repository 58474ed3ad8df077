"""Checkpoint reading, architecture inference, model loading and saving (ats_deploy.checkpoints)."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from conftest import SHARED_WEIGHTS as REAL_DEIT_TINY
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ats_deploy import checkpoints
from ats_deploy.checkpoints import infer_arch, load_model, read_checkpoint, save_checkpoint, sha256_file
from ats_deploy.errors import UserError
from ats_deploy.model import build, with_input_size

REG4 = "vit_small_patch14_reg4_dinov2"


class NotATensor:
    """Pickled into a checkpoint, it makes the file need code to load."""


def state_dict_of(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vit.state_dict().items()}


def meta_state_dict(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    """Shapes without memory: enough for infer_arch, which only looks at shapes."""
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, **kwargs).state_dict()


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def expect_error(fn: Callable[[], object], *fragments: str) -> str:
    """Run ``fn``, which must raise UserError whose message contains every fragment."""
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# --------------------------------------------------------------------------- formats


def write_deit_release(sd: dict, path: Path) -> Path:
    torch.save({"model": sd}, path)
    return path


def write_plain(sd: dict, path: Path) -> Path:
    torch.save(sd, path)
    return path


def write_safetensors(sd: dict, path: Path) -> Path:
    path = path.with_suffix(".safetensors")
    save_file(sd, path)
    return path


def write_safetensors_named_pth(sd: dict, path: Path) -> Path:
    save_file(sd, path)  # recognised by its content, not its suffix
    return path


def write_ats_authors(sd: dict, path: Path) -> Path:
    dim = sd["cls_token"].shape[-1]
    model_state = {f"module.{k}": v for k, v in sd.items()}
    for block in range(3, 12):
        model_state[f"module.blocks.{block}.attn.out_zero_mask"] = torch.zeros(1, dim)
    torch.save({"epoch": 29, "model_state": model_state, "optimizer_state": {}, "cfg": "MODEL: {}"}, path)
    return path


def write_timm_train(sd: dict, path: Path) -> Path:
    torch.save({"epoch": 1, "arch": "vit_tiny_patch16_224", "state_dict": sd, "metric": 0.5}, path)
    return path


FORMATS = {
    "deit-release": write_deit_release,
    "timm-state-dict": write_plain,
    "safetensors": write_safetensors,
    "safetensors-content": write_safetensors_named_pth,
    "ats-authors": write_ats_authors,
    "timm-train": write_timm_train,
}


# Formats that settle the architecture of a DeiT-Tiny state dict (DeiT and ViT-Tiny have the same tensors): their
# wrapper is DeiT's (release, ATS authors') or they name it (timm's training checkpoint). The others need --arch.
SETTLED = {"deit-release": "deit_tiny_patch16_224", "ats-authors": "deit_tiny_patch16_224",
           "timm-train": "vit_tiny_patch16_224"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_loads_back_identical_weights(name: str, random_deit_tiny: VisionTransformer, tmp_path: Path):
    sd = state_dict_of(random_deit_tiny)
    path = FORMATS[name](sd, tmp_path / "weights.pth")
    ckpt = read_checkpoint(path)
    assert ckpt.format == name.removesuffix("-content")
    assert ckpt.path == path
    assert ckpt.state_dict.keys() == sd.keys()  # no module. prefix, no out_zero_mask

    model = load_model(path, arch=None if name in SETTLED else "deit_tiny_patch16_224")

    assert_same_weights(model.vit, sd)
    assert model.arch == SETTLED.get(name, "deit_tiny_patch16_224")
    assert model.source == path
    assert model.checkpoint_format == ckpt.format
    assert not model.training


def test_a_resized_model_keeps_where_its_weights_came_from(random_deit_tiny, tmp_path: Path):
    path = write_deit_release(state_dict_of(random_deit_tiny), tmp_path / "weights.pth")
    resized = with_input_size(load_model(path), 160)
    assert resized.input_size == (3, 160, 160)
    assert (resized.source, resized.checkpoint_format) == (path, "deit-release")


def test_deit_release_is_taken_as_deit_saying_so_and_timm_train_keeps_its_arch(random_deit_tiny, tmp_path: Path):
    sd = state_dict_of(random_deit_tiny)
    release = load_model(write_deit_release(sd, tmp_path / "a.pth"))
    assert release.arch == "deit_tiny_patch16_224"
    (note,) = release.load_notes
    assert "DeiT repository's release format" in note and "--arch vit_tiny_patch16_224" in note
    assert "mean 0.485,0.456,0.406" in note
    timm_train = load_model(write_timm_train(sd, tmp_path / "c.pth"))
    assert (timm_train.arch, timm_train.load_notes) == ("vit_tiny_patch16_224", ())


@pytest.mark.parametrize("writer", ["timm-state-dict", "safetensors"])
def test_a_bare_state_dict_of_deit_or_vit_is_refused_naming_both_and_what_differs(writer, random_deit_tiny, tmp_path):
    """timm.create_model("deit_tiny_patch16_224").state_dict(): the same tensors as vit_tiny_patch16_224, which
    normalises with 0.5 instead of ImageNet's mean/std. For DeiT-S, guessing cost 3.5 points of top-1 silently."""
    path = FORMATS[writer](state_dict_of(random_deit_tiny), tmp_path / "deit_t.pth")
    expect_error(
        lambda: load_model(path),
        "deit_tiny_patch16_224: mean 0.485,0.456,0.406, std 0.229,0.224,0.225, crop 0.9, bicubic",
        "vit_tiny_patch16_224: mean 0.5,0.5,0.5, std 0.5,0.5,0.5",
        "the file does not say which",
        "Pass --arch",
    )
    assert load_model(path, arch="deit_tiny_patch16_224").arch == "deit_tiny_patch16_224"


@pytest.mark.parametrize("wrapper", ["lightning", "model-prefix"])
def test_a_checkpoint_with_the_vit_under_a_prefix_loads_without_it_saying_so(wrapper, random_deit_tiny, tmp_path):
    """PyTorch Lightning keeps the module as ``self.model``: keys ``model.patch_embed...`` (issue 23)."""
    sd = state_dict_of(random_deit_tiny)
    inner = {f"model.{k}": v for k, v in sd.items()}
    payload = {"state_dict": inner | {"criterion.weight": torch.ones(3)}, "epoch": 3, "global_step": 10,
               "pytorch-lightning_version": "2.4.0"} if wrapper == "lightning" else inner
    path = tmp_path / "last.ckpt"
    torch.save(payload, path)
    model = load_model(path, arch="deit_tiny_patch16_224")
    assert_same_weights(model.vit, sd)
    assert model.checkpoint_format == ("lightning" if wrapper == "lightning" else "timm-state-dict")
    (note,) = model.load_notes
    assert "under the key prefix 'model.'" in note
    assert ("left out 1 tensors" in note and "criterion.weight" in note) == (wrapper == "lightning")


def test_own_format_round_trip_keeps_arch_stages_and_keep(random_deit_tiny, tmp_path: Path):
    model = build(random_deit_tiny, "deit_tiny_patch16_224", stages=[2, 5, 8], keep=[0.5, 0.6, 0.7])
    path = save_checkpoint(model, tmp_path / "out" / "ats.pth")

    assert sorted(p.name for p in path.parent.iterdir()) == ["ats.pth"]  # no temp file left
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "ats-deploy" and raw["format_version"] == 1
    assert raw["img_size"] == [224, 224] and raw["num_classes"] == 1000

    loaded = load_model(path)
    assert (loaded.arch, loaded.stages, loaded.default_keep) == ("deit_tiny_patch16_224", [2, 5, 8], [0.5, 0.6, 0.7])
    assert loaded.checkpoint_format == "ats-deploy"
    assert_same_weights(loaded.vit, random_deit_tiny.state_dict())

    # Other stages: the checkpoint's keep (one per old stage) no longer applies.
    other = load_model(path, stages="3-5")
    assert (other.stages, other.default_keep) == ([3, 4, 5], [1.0, 1.0, 1.0])


def test_newer_own_format_asks_for_an_upgrade(tmp_path: Path):
    path = tmp_path / "future.pth"
    torch.save({"format": "ats-deploy", "format_version": 2, "model": {"x": torch.zeros(1)}}, path)
    expect_error(lambda: read_checkpoint(path), "format version 2", "Upgrade ats-deploy")


# --------------------------------------------------------------------------- inference


def test_infer_arch_of_deit_tiny():
    sd = meta_state_dict("deit_tiny_patch16_224")
    expect_error(lambda: infer_arch(sd), "deit_tiny_patch16_224", "vit_tiny_patch16_224", "--arch")
    assert infer_arch(sd, checkpoint_format="deit-release").arch == "deit_tiny_patch16_224"


def test_infer_arch_and_load_keep_the_class_count(tmp_path: Path):
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    assert infer_arch(vit.state_dict(), "deit-release").arch == "deit_tiny_patch16_224"
    model = load_model(write_deit_release(state_dict_of(vit), tmp_path / "ten.pth"))
    assert model.num_classes == 10
    assert_same_weights(model.vit, vit.state_dict())


def test_infer_arch_of_a_model_fine_tuned_at_another_resolution(tmp_path: Path):
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=256)
    # Nothing is named for 256 px: every patch-16 model with these tensors matches, ViTs at 224 and 384 among them.
    expect_error(lambda: infer_arch(vit.state_dict()), "vit_tiny_patch16_224", "vit_tiny_patch16_384", "--arch")
    model = load_model(write_deit_release(state_dict_of(vit), tmp_path / "256.pth"))
    assert (model.arch, model.input_size) == ("deit_tiny_patch16_224", (3, 256, 256))


def test_ambiguous_shapes_list_the_candidates():
    # The two CLIP variants differ only in their activation, which no tensor shape shows.
    sd = meta_state_dict("vit_base_patch16_clip_224")
    expect_error(lambda: infer_arch(sd), "vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224", "--arch")


def test_explicit_arch_is_honoured(random_deit_tiny, tmp_path: Path):
    path = write_deit_release(state_dict_of(random_deit_tiny), tmp_path / "w.pth")
    assert load_model(path, arch="vit_tiny_patch16_224").arch == "vit_tiny_patch16_224"


def test_unmatched_shapes_ask_for_arch(random_deit_tiny, tmp_path: Path):
    sd = {k: v for k, v in state_dict_of(random_deit_tiny).items() if not k.startswith("blocks.11.")}
    path = write_plain(sd, tmp_path / "eleven.pth")
    expect_error(lambda: load_model(path), "no timm ViT/DeiT architecture", "depth 11", "--arch")


@pytest.mark.parametrize(
    ("arch", "kwargs", "writer", "prefix"),
    [
        ("deit_tiny_distilled_patch16_224", {}, "deit-release", 2),
        ("deit_tiny_distilled_patch16_224", {"img_size": 112}, "safetensors", 2),
        # Nothing is named for 98 px: every patch-14 model is tried, some seconds.
        pytest.param(REG4, {"img_size": 98}, "timm-state-dict", 5, marks=pytest.mark.slow),
        pytest.param(REG4, {"img_size": 98, "num_classes": 0}, "safetensors", 5, marks=pytest.mark.slow),
    ],
)
def test_distilled_and_register_checkpoints_load_with_the_inferred_arch(arch, kwargs, writer, prefix, tmp_path):
    """Distillation and register tokens show in the tensors, so no --arch is needed: the size comes from pos_embed."""
    vit = timm.create_model(arch, pretrained=False, **kwargs)
    sd = state_dict_of(vit)
    model = load_model(FORMATS[writer](sd, tmp_path / "weights.pth"))
    assert (model.arch, model.load_notes) == (arch, ())
    assert (model.prefix_tokens, model.input_size) == (prefix, (3, *vit.patch_embed.img_size))
    assert_same_weights(model.vit, sd)


def test_a_distilled_checkpoint_is_matched_only_by_distilled_deits():
    sd = meta_state_dict("deit_small_distilled_patch16_224")
    assert infer_arch(sd) == checkpoints.Inferred("deit_small_distilled_patch16_224")
    del sd["dist_token"]  # a distillation head without its token: no timm model has that
    expect_error(lambda: infer_arch(sd), "no timm ViT/DeiT architecture", "--arch")


# --------------------------------------------------------------------------- random weights


def test_random_weights_are_seeded_without_touching_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("random:7", arch="deit_tiny_patch16_224", stages="3,6", keep=[0.5])
    b = load_model("random:7", arch="deit_tiny_patch16_224")
    c = load_model("random:8", arch="deit_tiny_patch16_224")
    assert torch.equal(torch.rand(1), expected_next)
    assert_same_weights(b.vit, a.vit.state_dict())
    assert not torch.equal(a.vit.cls_token, c.vit.cls_token)
    assert (a.stages, a.default_keep, a.source, a.checkpoint_format) == ([3, 6], [0.5, 0.5], None, "random")


def test_random_weights_need_arch_and_an_integer_seed():
    expect_error(lambda: load_model("random:0"), "--arch")
    expect_error(lambda: load_model("random:x", arch="deit_tiny_patch16_224"), "integer seed", "random:0")


def test_unknown_arch_suggests_close_names(random_deit_tiny, tmp_path: Path):
    expect_error(lambda: load_model("random:0", arch="deit_tiny_patch16_244"), "did you mean", "deit_tiny_patch16_224")
    path = write_plain(state_dict_of(random_deit_tiny), tmp_path / "w.pth")
    expect_error(lambda: load_model(path, arch="deit_tiny_patch61_224"), "unknown timm architecture")


# --------------------------------------------------------------------------- bad checkpoints


def test_missing_file(tmp_path: Path):
    expect_error(lambda: read_checkpoint(tmp_path / "nope.pth"), "does not exist", "nope.pth")


def test_directory_instead_of_file(tmp_path: Path):
    (tmp_path / "best.pth").write_bytes(b"x")
    expect_error(lambda: read_checkpoint(tmp_path), "is a directory", "best.pth", "checkpoint file itself")


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.pth"
    path.touch()
    expect_error(lambda: read_checkpoint(path), "empty", "re-download")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(suffix: str, random_deit_tiny, tmp_path: Path):
    sd = state_dict_of(random_deit_tiny)
    whole = write_safetensors(sd, tmp_path / "w") if suffix == ".safetensors" else write_plain(sd, tmp_path / "w.pth")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    expect_error(lambda: read_checkpoint(cut), "truncated, corrupt", "re-download or re-save")


def test_an_exported_model_given_as_a_checkpoint_is_named_as_one(tiny_ats_onnx, tmp_path: Path):
    """`inspect x.onnx` names what the file is and what reads it, instead of calling it corrupt."""
    message = expect_error(
        lambda: read_checkpoint(tiny_ats_onnx),
        "is an ONNX model (an exported model), not a checkpoint",
        "ats_deploy.runtime.open",
        "the checkpoint it was exported from",
    )
    assert "corrupt" not in message
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not really an engine")
    expect_error(lambda: read_checkpoint(engine), "model.plan is a TensorRT engine (an exported model)")


def test_garbage_bytes(tmp_path: Path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(7, 256)) * 40)
    expect_error(lambda: read_checkpoint(path), "corrupt", "garbage.pth")


def test_file_needing_code_names_the_trust_flag(random_deit_tiny, tmp_path: Path):
    sd = state_dict_of(random_deit_tiny)
    path = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": NotATensor()}, path)
    expect_error(lambda: read_checkpoint(path), "NotATensor", "--trust-checkpoint", "trusted source")
    assert_same_weights(load_model(path, trust_code=True).vit, sd)


def test_trusted_pickled_module_gives_its_state_dict(random_deit_tiny, tmp_path: Path):
    path = tmp_path / "whole_model.pth"
    torch.save(random_deit_tiny, path)
    expect_error(lambda: read_checkpoint(path), "VisionTransformer", "--trust-checkpoint")
    ckpt = read_checkpoint(path, trust_code=True)
    assert ckpt.format == "pickled-module"
    model = load_model(path, trust_code=True)
    assert model.arch == "deit_tiny_patch16_224"  # what timm recorded in the module's pretrained_cfg
    assert_same_weights(model.vit, random_deit_tiny.state_dict())


def test_missing_keys_are_listed_and_counted(random_deit_tiny, tmp_path: Path):
    sd = {k: v for k, v in state_dict_of(random_deit_tiny).items() if not k.startswith("blocks.11.")}
    path = write_plain(sd, tmp_path / "w.pth")
    message = expect_error(
        lambda: load_model(path, arch="deit_tiny_patch16_224"),
        "does not fit deit_tiny_patch16_224 (given with --arch)",
        "missing keys (12): blocks.11.",
        "and 7 more",
        "leave --arch out",
    )
    assert "unexpected" not in message


def test_unexpected_keys_are_listed(random_deit_tiny, tmp_path: Path):
    sd = state_dict_of(random_deit_tiny) | {"extra.weight": torch.zeros(2)}
    path = write_plain(sd, tmp_path / "w.pth")
    expect_error(lambda: load_model(path, arch="deit_tiny_patch16_224"), "unexpected keys (1): extra.weight")


def test_shape_mismatches_are_listed(random_deit_tiny, tmp_path: Path):
    path = write_plain(state_dict_of(random_deit_tiny), tmp_path / "w.pth")
    expect_error(
        lambda: load_model(path, arch="deit_small_patch16_224"),
        "shape mismatches (151): blocks.0.attn.proj.bias (checkpoint [192], model [384]),",
        "and 146 more",
    )


@pytest.mark.parametrize(
    ("content", "seen"),
    [({"epoch": 3, "note": "hello"}, "top-level keys 'epoch', 'note'"), ([torch.zeros(1)], "a list")],
)
def test_file_without_a_state_dict_says_what_it_saw(content, seen: str, tmp_path: Path):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    expect_error(lambda: read_checkpoint(path), "no recognisable state_dict", seen)


# --------------------------------------------------------------------------- writing


@pytest.fixture
def tiny_ats(random_deit_tiny):
    return build(random_deit_tiny, "deit_tiny_patch16_224")


def test_save_into_unwritable_location(tiny_ats, tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    expect_error(lambda: save_checkpoint(tiny_ats, blocker / "model.pth"), "cannot write", "writable")
    expect_error(lambda: save_checkpoint(tiny_ats, tmp_path), "is a directory")


def test_failed_save_leaves_the_old_file_and_no_temp(tiny_ats, tmp_path: Path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"previous")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    expect_error(lambda: save_checkpoint(tiny_ats, path), "No space left on device")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_sha256_file(tmp_path: Path):
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    expect_error(lambda: sha256_file(tmp_path / "absent.bin"), "does not exist")


# --------------------------------------------------------------------------- real weights


@pytest.mark.skipif(not REAL_DEIT_TINY.exists(), reason=f"real DeiT-Tiny weights not found at {REAL_DEIT_TINY}")
def test_real_deit_tiny_release_file_loads_with_inferred_arch():
    model = load_model(REAL_DEIT_TINY)
    assert model.arch == "deit_tiny_patch16_224"  # its {'model': ...} wrapper is the DeiT repository's
    assert model.checkpoint_format == "deit-release"
    assert "DeiT repository's release format" in model.load_notes[0]
    vit = model.vit
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (192, 12, 3)
    raw = torch.load(REAL_DEIT_TINY, map_location="cpu", weights_only=True)["model"]
    assert_same_weights(vit, raw)
