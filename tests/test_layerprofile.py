"""`catversion layers`: the per-layer integration profile of the text encoder(s) (catversion/layerprofile.py)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from catversion import layerprofile
from catversion.cli import main
from catversion.encoder import eos_positions
from catversion.models import load_base_model

PROMPTS = ["a photo of a teapot on a beach", "a dog wearing a blue hat", "an old red car", "teapot"]


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny", components=("tokenizer", "text_encoder"))


def uniform_integration(ends: list[int]) -> float:
    """A layer that attends uniformly (causal): content token i (2 <= i < end) spreads its weight over the i + 1
    positions 0..i, so i - 1 of them are the other content tokens: share (i - 1) / (i + 1)."""
    shares = [(i - 1) / (i + 1) for end in ends for i in range(2, end)]
    return sum(shares) / len(shares)


def test_the_measures_on_layers_whose_attention_and_output_are_known(tiny):
    model = copy.deepcopy(tiny.text_encoder)
    uniform, identity = model.encoder.layers[1], model.encoder.layers[3]
    with torch.no_grad():
        # Layer 1: no queries -> every score 0 -> uniform causal attention, whatever the keys.
        uniform.self_attn.q_proj.weight.zero_()
        uniform.self_attn.q_proj.bias.zero_()
        # Layer 3: adds nothing to the residual stream -> its output is its input.
        for linear in (identity.self_attn.out_proj, identity.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    ids = tiny.tokenize(PROMPTS)
    ends = eos_positions(model, ids).tolist()
    assert ends[-1] == 2  # "teapot": one content token, nothing to integrate: it adds no term
    integration, mixing = layerprofile.encoder_profile(model, ids)
    assert integration[1] == pytest.approx(uniform_integration(ends), abs=1e-6)
    assert layerprofile.uniform_baseline(model, ids) == pytest.approx(uniform_integration(ends), abs=1e-12)
    assert mixing[3] == pytest.approx(0.0, abs=1e-6)
    assert all(m > 0.01 for i, m in enumerate(mixing) if i != 3)
    # The untouched base model is not uniform in layer 1: the measure reads the attention, not a constant.
    assert layerprofile.encoder_profile(tiny.text_encoder, ids)[0][1] != pytest.approx(integration[1], abs=1e-4)


def test_attention_weights_are_the_models_own(tiny):
    eager = copy.deepcopy(tiny.text_encoder)
    eager.set_attn_implementation("eager")
    ids = tiny.tokenize(PROMPTS[:2])
    with torch.no_grad():
        out = eager(input_ids=ids, output_hidden_states=True, output_attentions=True)
        for index, layer in enumerate(eager.encoder.layers):
            ours = layerprofile.attention_weights(layer, out.hidden_states[index])
            torch.testing.assert_close(ours, out.attentions[index], atol=1e-5, rtol=1e-5)


def test_the_suggested_window_is_the_best_feeding_one_and_ties_go_later():
    assert layerprofile.suggest_window([0.1, 0.9, 0.9, 0.9, 0.2], feeding=5) == (1, 2, 3)
    assert layerprofile.suggest_window([0.5] * 6, feeding=6) == (3, 4, 5)  # all tied: the last window
    # The best layer does not feed the UNet (SDXL's last): it cannot be suggested.
    assert layerprofile.suggest_window([0.1, 0.2, 0.3, 0.4, 1.0], feeding=4) == (1, 2, 3)
    assert layerprofile.suggest_window([0.3, 0.1], feeding=2) == (0, 1)
    with pytest.raises(ValueError, match="no layer feeds"):
        layerprofile.suggest_window([0.3], feeding=0)


def test_sdxl_profiles_both_encoders_and_never_suggests_their_last_layer():
    base = load_base_model("tiny-sdxl", components=("tokenizer", "text_encoder"))
    profiles = layerprofile.profile_model(base, PROMPTS)
    assert [p.encoder for p in profiles] == ["text_encoder", "text_encoder_2"]
    for profile in profiles:
        assert len(profile.integration) == len(profile.mixing) == profile.depth == 5
        assert all(0.0 <= v <= 1.0 for v in profile.integration)
        assert all(0.0 <= v <= 2.0 for v in profile.mixing)
        assert profile.feeding == 4 and profile.default == (1, 2, 3)
        assert len(profile.suggested) == 3 and 4 not in profile.suggested
        assert [row["feeds_unet"] for row in profile.to_dict()["layers"]] == [True, True, True, True, False]
        assert 0.0 < profile.uniform < 1.0


def test_the_command_prints_a_table_per_encoder(capsys):
    assert main(["layers", "--model", "tiny-sdxl", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "text_encoder:" in out and "text_encoder_2:" in out
    assert out.count("suggested window: layers") == 2 and out.count("not read by the UNet") == 2
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3, 4] * 2


def test_json_output_and_a_prompt_file_and_a_plot(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na teapot on a beach\n\na cat on a sofa in the sun\n")
    plot = tmp_path / "profile.svg"
    assert main(["layers", "--model", "tiny", "--device", "cpu", "--prompts", str(prompts), "--json",
                 "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "sd1" and data["prompts"] == 2 and data["plot"] == str(plot)
    [encoder] = data["encoders"]
    assert encoder["encoder"] == "text_encoder" and encoder["depth"] == 5 and len(encoder["layers"]) == 5
    assert all(row["feeds_unet"] for row in encoder["layers"])  # SD 1.x reads the last layer
    assert encoder["default"] == [2, 3, 4] and len(encoder["suggested"]) == 3
    assert encoder["agree"] == (encoder["suggested"] == encoder["default"])
    assert "<svg" in plot.read_text()


def test_errors_are_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing here\n")
    assert main(["layers", "--model", "tiny", "--prompts", str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "no prompts" in err
    assert main(["layers", "--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "Traceback" not in err
    assert main(["layers", "--model", "tiny", "--plot", str(tmp_path / "x.pdf")]) == 1
    assert ".svg or .png" in capsys.readouterr().err


def test_help_loads_no_torch():
    probe = ("import contextlib, io, sys\nfrom catversion.cli import main\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "    main(['layers', '--help'])\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
