"""The `catversion` command as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import boto3
import torch

from catversion import Residual
from catversion.cli import main
from PIL import Image

from helpers import png_bytes
from test_residual import write_reference_checkpoint


def test_import_then_export_official_round_trip(tmp_path, capsys):
    src = tmp_path / "adapter"
    src.mkdir()
    flat = torch.randn(4608)
    write_reference_checkpoint(src / "pytorch_adapter.bin", flat)
    out = tmp_path / "teapot.safetensors"
    assert main(["import-official", str(src), str(out), "--class-word", "teapot"]) == 0
    r = Residual.load(out)
    assert r.prefix_logit_bias == 1.0 and r.meta["class_word"] == "teapot"

    assert main(["export-official", str(out), str(tmp_path / "exported")]) == 0
    before = torch.load(src / "pytorch_adapter.bin", weights_only=True)
    after = torch.load(tmp_path / "exported" / "pytorch_adapter.bin", weights_only=True)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["hidden_size"] == 768 and config["config"]["prefix_length"] == 1

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["class_word"] == "teapot"


def test_errors_exit_non_zero_with_a_message(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a residual at all, just text")
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "junk.safetensors" in err and "not a safetensors file" in err
    assert main(["import-official", str(tmp_path / "nope.bin"), str(tmp_path / "x.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "catversion"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "import-official" in done.stdout and "export-official" in done.stdout


def test_train_then_generate(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(png_bytes(i))
    (photos / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "teapot.safetensors"
    argv = ["train", "--images", str(photos), "--class-word", "teapot", "--out", str(out), "--model", "tiny",
            "--steps", "4", "--save-steps", "2", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    r = Residual.load(out)
    assert r.meta["steps"] == 4 and r.meta["class_word"] == "teapot" and r.meta["base_model"] == "tiny"
    assert Residual.load(tmp_path / "teapot.step2.safetensors").meta["steps"] == 2

    # --model defaults to the base model recorded in the residual
    image = tmp_path / "img" / "beach.png"
    argv = ["generate", "--residual", str(out), "--prompt", "a teapot on a beach", "--out", str(image), "--n", "2",
            "--steps", "3", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    for name in ("beach-0.png", "beach-1.png"):
        assert Image.open(tmp_path / "img" / name).size == (64, 64)


def test_a_residual_trained_with_the_defaults_exports_to_the_reference_format(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"{i}.png").write_bytes(png_bytes(i))
    out = tmp_path / "teapot.safetensors"
    # Only --steps differs from the defaults (to keep the test fast): the recipe is the reference one.
    assert main(["train", "--images", str(photos), "--class-word", "teapot", "--out", str(out), "--model", "tiny",
                 "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    residual = Residual.load(out)
    assert residual.prefix_logit_bias == 1.0
    assert main(["export-official", str(out), str(tmp_path / "exported")]) == 0  # no --force needed
    state = torch.load(tmp_path / "exported" / "pytorch_adapter.bin", weights_only=True)
    back = Residual.from_official(tmp_path / "exported" / "pytorch_adapter.bin")
    assert len(state) == 4 and torch.equal(back.tensor, residual.tensor) and back.layers == residual.layers

    # The paper's clean equation is one option away, and then exporting needs --force.
    clean = tmp_path / "clean.safetensors"
    assert main(["train", "--images", str(photos), "--class-word", "teapot", "--out", str(clean), "--model", "tiny",
                 "--steps", "2", "--device", "cpu", "--quiet", "--prefix-logit-bias", "0"]) == 0
    assert Residual.load(clean).prefix_logit_bias == 0.0
    capsys.readouterr()
    assert main(["export-official", str(clean), str(tmp_path / "clean.bin")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["export-official", str(clean), str(tmp_path / "clean.bin"), "--force"]) == 0


def test_residual_commands_read_s3_uris(tmp_path, s3_bucket, capsys):
    out = tmp_path / "r.safetensors"
    write_reference_checkpoint(tmp_path / "pytorch_adapter.bin", torch.randn(4608))
    assert main(["import-official", str(tmp_path / "pytorch_adapter.bin"), str(out), "--class-word", "mug"]) == 0
    uri = f"s3://{s3_bucket}/run/r.safetensors"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="run/r.safetensors", Body=out.read_bytes())
    capsys.readouterr()
    assert main(["inspect", uri]) == 0
    assert json.loads(capsys.readouterr().out)["class_word"] == "mug"
    assert Residual.load(uri).sha256 == Residual.load(out).sha256
    assert main(["inspect", f"s3://{s3_bucket}/run/missing.safetensors"]) == 1
    assert "missing.safetensors does not exist" in capsys.readouterr().err


def test_train_errors_name_the_bad_input(tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    argv = ["train", "--images", str(tmp_path / "broken.jpg"), "--class-word", "cat", "--out", str(tmp_path / "c.safetensors"),
            "--model", "tiny", "--steps", "2", "--quiet", "--device", "cpu"]
    assert main(argv) == 1
    assert "broken.jpg is not a decodable image" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()
    argv[2] = str(tmp_path / "missing")
    assert main(argv) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "ok.png").write_bytes(png_bytes(1))
    argv[2] = str(tmp_path / "ok.png")
    argv[argv.index("--model") + 1] = str(tmp_path / "no-model-here")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no-model-here" in err and "does not exist" in err


def test_train_then_generate_on_sdxl_with_chosen_layers(tmp_path, capsys):
    """tiny-sdxl through the command line: --layers per text encoder, a residual of two blocks that inspect shows,
    generate on the base model it records, and clear errors for layers or a base model that do not fit."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"{i}.png").write_bytes(png_bytes(i))
    out = tmp_path / "teapot.safetensors"
    argv = ["train", "--images", str(photos), "--class-word", "teapot", "--out", str(out), "--model", "tiny-sdxl",
            "--steps", "3", "--save-steps", "", "--device", "cpu", "--quiet", "--layers", "0,1,2;1,2,3"]
    assert main(argv) == 0
    assert Residual.load(out).layer_sets == ((0, 1, 2), (1, 2, 3))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [b["encoder"] for b in shown["blocks"]] == ["text_encoder", "text_encoder_2"] and shown["base_family"] == "sdxl"
    image = tmp_path / "beach.png"
    assert main(["generate", "--residual", str(out), "--prompt", "a teapot on a beach", "--out", str(image),
                 "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    assert Image.open(image).size == (64, 64)

    assert main(argv[:-1] + ["2,3,4;1,2,3"]) == 1  # layer 4 of a 5-layer encoder never reaches hidden_states[-2]
    assert "layers [2, 3, 4] of text_encoder: choose distinct layers in 0..3" in capsys.readouterr().err
    assert main(["generate", "--residual", str(out), "--model", "tiny", "--prompt", "a teapot", "--out",
                 str(tmp_path / "x.png"), "--steps", "2", "--device", "cpu", "--quiet"]) == 1
    assert "trained for a sdxl base model (tiny-sdxl) but the loaded base model tiny is sd1" in capsys.readouterr().err
