"""The command line as a user meets it: help, the happy paths, and one clear message per mistake."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import invoke, plain
from conftest import SHARED_WEIGHTS
from PIL import Image

from ats_deploy import __version__

RANDOM = ["random:0", "--arch", "deit_tiny_patch16_224"]




def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"ats-deploy {__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("inspect", "convert", "predict", "export", "check"):
        assert name in result.stdout


def test_inspect_random_model():
    result = invoke("inspect", *RANDOM)
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "deit_tiny_patch16_224" in out and "3,4,5,6,7,8,9,10,11" in out and "1.25" in out


def test_convert_then_inspect_keeps_stages_and_keep(tmp_path):
    target = tmp_path / "deit_t_ats.pt"
    result = invoke("convert", *RANDOM, "--stages", "4-6", "--keep", "0.8,0.7,0.6", "-o", target)
    assert result.exit_code == 0, result.output
    out = plain(invoke("inspect", target).stdout)
    assert "4,5,6" in out and "0.8,0.7,0.6" in out and "ats-deploy" in out


def test_predict_names_the_cat(tmp_path):
    if not SHARED_WEIGHTS.exists():
        pytest.skip(f"real DeiT-Tiny weights not found at {SHARED_WEIGHTS}")
    result = invoke("predict", SHARED_WEIGHTS, "skimage:chelsea", "--keep", "0.7")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert re.search(r"Egyptian cat|tabby|tiger cat", out)
    assert "kept tokens per stage" in out and "GFLOPs" in out


def test_export_dynamic_validates_and_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("export", *RANDOM, "--dynamic")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "validated" in out and "FAIL" not in out
    onnx_file = tmp_path / "deit_tiny_patch16_224_ats.onnx"
    assert onnx_file.exists()
    assert invoke("check", onnx_file, "--target", "tensorrt-10", "--target", "onnxruntime").exit_code == 0
    refused = invoke("check", onnx_file, "--target", "dla")
    assert refused.exit_code != 0 and "not compatible with dla" in plain(refused.output)


def test_export_static_from_a_profile(tmp_path):
    out = tmp_path / "static.onnx"
    result = invoke("export", *RANDOM, "--profile", "cpu", "-o", out, "--no-validate")
    assert result.exit_code == 0, result.output
    assert "static (batch 1, keep baked in)" in plain(result.stdout)
    assert invoke("check", out, "--target", "dla").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "random:0", "--arch", "nosuch_vit"], "nosuch_vit"),
        (["export", "random:0"], "--arch"),
        (["export", *RANDOM, "--stages", "3-12"], "outside the model's blocks 0-11"),
        (["export", *RANDOM, "--keep", "0.5,0.5"], "2 values but the model has 9 ATS stages"),
        (["export", *RANDOM, "--keep", "nan"], "keep value nan is invalid"),
        (["export", *RANDOM, "--keep", "inf"], "keep value inf is invalid"),
        (["export", *RANDOM, "--keep", "0"], "keep value 0.0 is invalid"),
        (["export", *RANDOM, "--keep", "abc"], "cannot read --keep"),
        (["export", *RANDOM, "-o", "/nonexistent-dir/x.onnx"], "does not exist"),
        (["export", *RANDOM, "--exporter", "jit"], "unknown --exporter"),
        (["export", *RANDOM, "--ats-op", "custom", "--exporter", "dynamo"], "needs --exporter torchscript"),
        (["export", *RANDOM, "--ats-op", "plugin"], "unknown --ats-op"),
        (["export", *RANDOM, "--img-size", "200"], "not a positive multiple of the patch size 16"),
        (["export", *RANDOM, "--profile", "nosuch-device"], "nosuch-device"),
        (["export", "missing.pt"], "missing.pt"),
        (["inspect", "."], "directory"),
        (["check", "missing.onnx"], "missing.onnx"),
        (["predict", *RANDOM, "skimage:nosuchphoto"], "nosuchphoto"),
        (["predict", *RANDOM, "nosuch.jpg"], "image not found"),
    ],
)
def test_user_errors_are_one_clear_message(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in plain(result.output)
    assert "Traceback" not in result.output
    assert not list(Path(tmp_path).glob("*.onnx")), "no half-written output"


def test_export_with_custom_ops_validates_and_builds_with_the_plugin_note(tmp_path):
    out = tmp_path / "custom.onnx"
    result = invoke("export", *RANDOM, "--dynamic", "--ats-op", "custom", "-o", out)
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.stdout)
    built = invoke("build", out, "--profile", "jetson")
    assert "plain trtexec cannot load" in plain(built.output)
    assert built.exit_code != 0 and "TensorRT" in plain(built.output)


def test_export_at_another_input_size(tmp_path):
    out = tmp_path / "small.onnx"
    result = invoke("export", *RANDOM, "--dynamic", "--img-size", "160", "--stages", "4,8", "-o", out)
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.stdout)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 160, 160]


def test_corrupt_onnx_is_one_clear_message(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    result = invoke("check", bad)
    assert result.exit_code != 0 and "not a valid ONNX model" in plain(result.output)


# A file name that is both rich markup ("[b]") and an emoji code (":coffee:").
MARKUP_NAME = "[b]cat:coffee:.png"


def test_predict_prints_image_names_as_written(tmp_path):
    image = tmp_path / MARKUP_NAME
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = invoke("predict", *RANDOM, image, "skimage:coffee", "--top", "1")
    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert MARKUP_NAME in out and "skimage:coffee (" in out and "\u2615" not in out


def test_error_messages_print_user_text_as_written():
    result = invoke("check", MARKUP_NAME.replace(".png", ".onnx"))
    assert result.exit_code != 0 and "[b]cat:coffee:.onnx" in plain(result.output)


@pytest.mark.parametrize(
    ("command", "text"),
    [("bench", "DIR/<class>/<image>"), ("tune", "<name>.pareto.png"), ("build", "<engine stem>.fp16.onnx")],
)
def test_help_keeps_angle_brackets(command, text):
    """typer's markdown mode drops `<word>` as an HTML tag unless it is quoted as code."""
    result = invoke(command, "--help")
    assert result.exit_code == 0 and text in plain(result.stdout)


def test_bench_report_prints_names_as_written():
    from rich.console import Console

    from ats_deploy.bench.report import render
    from ats_deploy.bench.results import BenchResult, VariantResult
    from ats_deploy.bench.timing import Latency
    from ats_deploy.bench.variants import PYTORCH_DENSE
    from ats_deploy.profiles import load_profile

    dense = VariantResult(PYTORCH_DENSE, "pytorch", 1.0, 1.26, np.zeros((1, 0)), Latency([1.0, 1.0], 1))
    result = BenchResult(
        created="now",
        model={"path": "[b]model:rocket:.onnx"},
        profile=load_profile("cpu"),
        backend="onnxruntime",
        precision="fp32",
        keep=[0.6],
        keep_origin="profile 'cpu'",
        data={"labelled": False, "images": 1, "source": "skimage:coffee", "skipped_corrupt": 1,
              "skipped_files": [{"file": MARKUP_NAME, "reason": "cannot read"}]},
        accuracy_metric="agreement",
        variants=[dense],
        comparison=None,
        environment={},
        warnings=["[red]image skimage:coffee: odd[/red]"],
    )
    console = Console(record=True, width=300)
    render(result, console)
    out = console.export_text()
    for text in ("[b]model:rocket:.onnx", "from skimage:coffee", f"skipped {MARKUP_NAME}: cannot read",
                 "warning: [red]image skimage:coffee: odd[/red]"):
        assert text in out, text


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


HEAVY = "[m for m in ('torch', 'timm', 'onnx', 'onnxruntime') if m in sys.modules]"


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["export"], 2), (["check", "--help"], 0)])
def test_help_and_argument_errors_import_no_torch(argv, code):
    """`ats-deploy --help` must not wait seconds for torch: neither the CLI module nor its parser loads it."""
    run = _python(
        "import sys\nimport ats_deploy.cli as cli\n"
        f"assert not {HEAVY}, {HEAVY}\n"
        f"sys.argv = ['ats-deploy', *{argv!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit as done:\n    code = done.code\n"
        f"print('exit', code, 'heavy', {HEAVY})\n"
    )
    assert run.returncode == 0, run.stderr
    assert f"exit {code} heavy []" in run.stdout


def test_the_package_loads_the_model_only_when_asked():
    run = _python(
        "import sys, ats_deploy\nassert 'torch' not in sys.modules\n"
        "from ats_deploy import ATSOutput, ATSVisionTransformer\nprint(ATSVisionTransformer.__module__)"
    )
    assert run.returncode == 0 and run.stdout.strip() == "ats_deploy.model", run.stderr


def test_ctrl_c_outside_a_command_is_one_line_and_exit_130():
    run = _python(
        "import ats_deploy.cli as cli\n"
        "def interrupted():\n    raise KeyboardInterrupt\n"
        "cli.app = interrupted\ncli.main()\n"
    )
    assert run.returncode == 130 and run.stderr.strip() == "interrupted", run.stderr


def test_ctrl_c_inside_a_command_is_one_line_and_exit_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ats_deploy.checkpoints.load_model", interrupted)
    result = invoke("inspect", *RANDOM)
    assert result.exit_code == 130 and plain(result.output) == "interrupted"


def test_keep_above_one_that_is_not_a_whole_number_is_refused(here):
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic", "--keep", "1.5")
    assert result.exit_code == 2
    assert "clamp(floor(1.5), P + 1, n0) = 2 tokens" in plain(result.output)
    assert not list(here.iterdir())


def test_a_keep_below_the_budget_floor_is_noted(here):
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic", "--keep", "1e-9",
                    "--no-validate")
    assert result.exit_code == 0, result.output
    assert "keep 1e-09 gives K = 8 tokens, the floor" in plain(result.output)


@pytest.mark.parametrize(("stages", "message"), [("11-3", "runs backwards; did you mean '3-11'"), ("", "cannot read")])
def test_stages_that_would_silently_mean_none_are_refused(here, stages, message):
    result = invoke("convert", "random:0", "--arch", "deit_tiny_patch16_224", "--stages", stages, "-o", "x.pt")
    assert result.exit_code == 2 and message in plain(result.output)
    assert not list(here.iterdir())


def test_a_dense_checkpoint_converts_and_exports(here):
    result = invoke("convert", "random:0", "--arch", "deit_tiny_patch16_224", "--stages", "none", "-o", "dense.pt")
    assert result.exit_code == 0 and "stages none, keep -" in plain(result.output)
    result = invoke("export", "dense.pt", "--dynamic")
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.output)


def test_each_export_kind_has_its_own_default_name(here):
    args = ("random:0", "--arch", "deit_tiny_patch16_224", "--no-validate")
    assert invoke("export", *args, "--dynamic").exit_code == 0
    assert invoke("export", *args, "--profile", "jetson-dla").exit_code == 0
    assert invoke("export", *args, "--dynamic", "--ats-op", "custom").exit_code == 0
    names = sorted(p.name for p in here.glob("*.onnx"))
    assert names == [
        "deit_tiny_patch16_224_ats.custom-op.onnx",
        "deit_tiny_patch16_224_ats.onnx",
        "deit_tiny_patch16_224_ats.static-b1-k0.7.onnx",
    ], names


def test_opset_17_export_reads_as_meant_by_tensorrt_8_6(here):
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic", "--opset", "17",
                    "-o", "o17.onnx")
    assert result.exit_code == 0, result.output
    from ats_deploy.exporters.compat import check_model

    model = onnx.load("o17.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    report = check_model(model, "tensorrt-8.6")
    assert report.ok and not [f for f in report.warnings if "opset" in f.message]


def test_the_dynamo_exporter_prints_no_generated_code(here):
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic", "--exporter", "dynamo",
                    "--no-validate")
    assert result.exit_code == 0, result.output
    assert "def forward" not in result.output and len(result.output.splitlines()) < 10


def test_output_that_is_not_a_terminal_is_never_wrapped(here, monkeypatch):
    """A pipe or log at COLUMNS=40: messages, paths and table titles stay whole, each on its line."""
    monkeypatch.setenv("COLUMNS", "40")
    deep = here / ("a-folder-name-long-enough-to-pass-forty-columns" * 2) / "and-deeper"
    deep.mkdir(parents=True)
    target = deep / "deit_t_ats.pt"
    result = invoke("convert", *RANDOM, "-o", target)
    assert result.exit_code == 0, result.output
    assert f"wrote {target}: deit_tiny_patch16_224, stages 3,4,5,6,7,8,9,10,11, keep 1" in result.output.splitlines()
    result = invoke("inspect", target)
    assert str(target) in [line.strip() for line in result.output.splitlines()], result.output  # the table's title
    missing = deep / "missing.pth"
    result = invoke("inspect", missing)
    assert f"error: {missing} does not exist; check the path" in result.output.splitlines()[0], result.output


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["export", "visualize"])
def test_a_full_disk_is_one_message_and_leaves_no_file(command, here, monkeypatch):
    if command == "export":  # the ONNX file is written after tracing, through onnx.save
        monkeypatch.setattr("ats_deploy.exporters.onnx_export.onnx.save", _disk_full)
        args = ["export", *RANDOM, "--dynamic", "--no-validate", "-o", "out.onnx"]
    else:  # the PNG through write_atomic
        monkeypatch.setattr(Path, "write_bytes", _disk_full)
        args = ["visualize", *RANDOM, "skimage:chelsea", "-o", "out.png"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = plain(result.output)
    assert lines.startswith(f"error: cannot write out.{'onnx' if command == 'export' else 'png'}: No space left")
    assert "Free space on the disk" in lines and "Traceback" not in result.output
    assert list(here.iterdir()) == [], "no file, no temporary file"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["export", "visualize"])
def test_an_unwritable_target_like_proc_is_one_message(command, here):
    target = f"/proc/x.{'onnx' if command == 'export' else 'png'}"
    given = {"export": ["--dynamic", "--no-validate"], "visualize": ["skimage:chelsea"]}[command]
    result = invoke(command, *RANDOM, *given, "-o", target)
    assert result.exit_code == 2, result.output
    assert "cannot write" in plain(result.output) and "/proc" in plain(result.output), result.output
    assert "Traceback" not in result.output and not Path(target).exists()


def test_convert_never_writes_a_guessed_arch_and_inspect_says_how_it_was_settled(here, random_deit_tiny):
    """DeiT and ViT state dicts have the same tensors: a bare one is refused; a DeiT release file is DeiT, said so."""
    import torch

    torch.save(random_deit_tiny.state_dict(), "deit_t.pth")
    result = invoke("convert", "deit_t.pth", "-o", "out.pt")
    assert result.exit_code == 2, result.output
    assert "deit_tiny_patch16_224: mean 0.485,0.456,0.406" in plain(result.output), result.output
    assert "vit_tiny_patch16_224: mean 0.5,0.5,0.5" in plain(result.output) and "Pass --arch" in plain(result.output)
    assert not Path("out.pt").exists()
    result = invoke("convert", "deit_t.pth", "--arch", "deit_tiny_patch16_224", "-o", "out.pt")
    assert result.exit_code == 0 and "wrote out.pt: deit_tiny_patch16_224" in plain(result.output), result.output

    torch.save({"model": random_deit_tiny.state_dict()}, "release.pth")
    result = invoke("inspect", "release.pth")
    assert result.exit_code == 0, result.output
    assert "note: architecture deit_tiny_patch16_224 (mean 0.485,0.456,0.406" in plain(result.output)
    assert "DeiT repository's release format" in plain(result.output)


def test_an_output_folder_means_put_it_in_there(here):
    """`-o out/` or an existing folder: the file goes inside under its default name; never a file called `out`."""
    Path("out").mkdir()
    result = invoke("export", *RANDOM, "--dynamic", "--no-validate", "-o", "out/")
    assert result.exit_code == 0, result.output
    assert [p.name for p in Path("out").iterdir()] == ["deit_tiny_patch16_224_ats.onnx"]
    result = invoke("visualize", *RANDOM, "skimage:chelsea", "-o", "out")
    assert result.exit_code == 0 and Path("out/chelsea-tokens.png").is_file(), result.output

    result = invoke("export", *RANDOM, "--dynamic", "--no-validate", "-o", "missing/")
    assert result.exit_code == 2 and "output directory missing does not exist" in plain(result.output)
    result = invoke("convert", *RANDOM, "-o", "saved/")  # no default name: a folder is refused, not made a file
    assert result.exit_code == 2 and "output saved/ is a folder; give a file name" in plain(result.output)
    assert sorted(p.name for p in here.iterdir()) == ["out"]


def test_progress_off_a_terminal_is_a_line_at_each_tenth_and_at_the_end():
    """rich draws no bar into a log; a counted pass prints plain lines there instead (ats_deploy/console.py)."""
    import io

    from ats_deploy.console import OutputConsole, counted, step

    log = io.StringIO()
    console = OutputConsole(file=log)
    with step(console, "exporting"), counted(console, "accuracy", 20) as advance:
        for _ in range(20):
            advance(1)
    heads = [re.sub(r",? (in )?[0-9.]+ s$", "", line) for line in log.getvalue().splitlines()]  # times cut off
    tenths = [f"accuracy: {done}/20" for done in range(2, 20, 2)]
    assert heads == ["exporting ...", "accuracy: 0/20", *tenths, "accuracy: done (20/20)", "exporting: done"]
