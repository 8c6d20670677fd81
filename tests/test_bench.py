"""``brainmm bench`` runs (one tiny iteration each); tests never check timings."""

from __future__ import annotations

import json

from brainmm.cli import main


def test_bench_masking_and_pretrain_step(tmp_path, capsys):
    assert main(["bench", "masking", "--batch", "2", "--crop", "16", "--atlas", "32", "32", "32", "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "brainmm batched" in out and "per-sample loop" in out
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["rows"][1]["speedup"] > 0 and result["env"]["device"] == "cpu"
    assert main(["bench", "pretrain-step", "--arch", "mmvp_unet_tiny", "--batch", "1", "--crop", "16", "--atlas",
                 "16", "16", "16", "--variants", "eager-fp32", "eager-bf16", "--warmup", "0", "--repeats", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "eager-bf16" in out and "volumes_per_s" in out


def test_bench_loader(tmp_path, capsys):
    assert main(["bench", "loader", "--data", "demo", "--studies", "2", "--crop", "16", "--atlas", "32", "32", "32",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    assert "brainmm preprocessed cache" in capsys.readouterr().out


def test_bench_inference(capsys):
    assert main(["bench", "inference", "--arch", "mmvp_swin_tiny", "--shape", "72", "72", "40", "--crop", "64",
                 "--batch", "2", "--variants", "fp32", "bf16", "--no-baseline", "--warmup", "0", "--repeats", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "brainmm mmvp_swin_tiny fp32" in out and "dice_vs_fp32" in out


def test_bench_pretrain_step_profile_and_swinunetr_baseline(tmp_path, capsys):
    # the baseline is MONAI's full SwinUNETR (feature 48); 64^3 is the smallest crop it trains on
    assert main(["bench", "pretrain-step", "--arch", "mmvp_unet_tiny", "--batch", "1", "--crop", "64", "--atlas",
                 "64", "64", "64", "--variants", "eager-fp32", "--baseline", "--baseline-batch", "1", "--profile",
                 "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "MONAI SwinUNETR train step, batch 1, eager-fp32" in out and "profile of eager-fp32:" in out
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert rows[0]["profile"] and rows[0]["profile"][0]["ms_per_step"] > 0 and rows[1]["tflops"] > 0


def test_bench_variant_errors():
    import pytest

    from brainmm.bench import parse_variant

    assert parse_variant("compile-bf16+triton+cl") == {"mode": "compile", "precision": "bf16", "depthwise": "triton",
                                                       "channels_last": True}
    with pytest.raises(ValueError, match="Unknown variant 'eager-fp64'"):
        parse_variant("eager-fp64")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        from brainmm.bench import bench_pretrain_step

        bench_pretrain_step("mmvp_unet_tiny", batch=1, crop=16, atlas=(16, 16, 16), variants=("eager-fp32+triton",),
                            device="cpu")


def test_bench_ops_and_suite(tmp_path, capsys):
    assert main(["bench", "ops", "--batch", "1", "--crop", "16", "--warmup", "0", "--repeats", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch channels_last bf16" in out and "step_total_ms" in out
    assert main(["bench", "suite", "--tiny", "--device", "cpu", "--crop", "32", "--batch", "1", "--shape", "40", "40",
                 "36", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--parts", "pretrain-uniformer",
                 "ops", "inference"]) == 0
    report = (tmp_path / "suite.md").read_text()
    assert "FAILED" not in report and "| eager-bf16 |" in report and "| brainmm mmvp_swin_tiny bf16 |" in report
    assert {p.name for p in tmp_path.glob("*.json")} == {"pretrain-uniformer.json", "ops.json", "inference.json"}
    targets = (tmp_path / "targets.md").read_text()
    assert "| 1. mmvp_uniformer pre-training step | >= 40 volumes/s |" in targets
    assert "| 3. 240x240x155 inference |" in targets
