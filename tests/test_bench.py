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
