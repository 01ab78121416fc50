"""The command line: resolved configs, model info, overrides and errors."""

import yaml
from typer.testing import CliRunner

from archifactory.cli import app

runner = CliRunner()


def test_config_prints_resolved_yaml_with_overrides():
    result = runner.invoke(app, ["config", "tiny", "--set", "mixer.n_kv_heads=1", "--set", "position.kind=alibi"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["mixer"]["n_kv_heads"] == 1 and data["position"] == {"kind": "alibi"}
    assert data["ffn"]["kind"] == "swiglu"


def test_info_reports_params_and_flops():
    result = runner.invoke(app, ["info", "tiny"])
    assert result.exit_code == 0, result.output
    assert "951,424" in result.output and "training FLOPs per token" in result.output


def test_presets_lists_files():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "llama-26m" in result.output


def test_config_error_is_clear_and_exits_2():
    result = runner.invoke(app, ["info", "tiny", "--set", "mixer.n_heads=3"])
    assert result.exit_code == 2
    assert "mixer.n_heads" in result.output and "does not divide d_model=128" in result.output
    result = runner.invoke(app, ["config", "missing.yaml"])
    assert result.exit_code == 2 and "not found" in result.output


def test_hf_round_trip_through_cli(tmp_path):
    import torch

    import archifactory as af

    model = af.CausalLM.from_config("tiny", ["n_layers=2"])
    model.save_pretrained(tmp_path / "ours")
    assert runner.invoke(app, ["hf", "export", str(tmp_path / "ours"), str(tmp_path / "hf")]).exit_code == 0
    result = runner.invoke(app, ["hf", "import", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = af.CausalLM.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, 2048, (1, 7))
    torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
