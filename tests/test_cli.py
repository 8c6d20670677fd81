"""The ``brainmm`` command line: output, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import brainmm
from brainmm.cli import main
from brainmm.data.synthetic import write_synthetic_dataset

from .conftest import official_state_dict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("cli") / "syn", n_studies=3, shape=(32, 32, 32), seed=1)


def test_list_and_filter(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in brainmm.list_models():
        assert name in out
    assert main(["list", "mmvp_swin*"]) == 0
    assert "mmvp_unet" not in capsys.readouterr().out
    assert main(["list", "--pretrained"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["mmvp_uniformer.brainmvp"][1:4] == ["planned", "no", "apache-2.0"]


def test_info(capsys):
    assert main(["info", "mmvp_uniformer", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"].startswith("22,0") and info["pooled features"] == 512
    assert info["stage maps"] == ["64 ch @ 1/2", "128 ch @ 1/4", "320 ch @ 1/8", "512 ch @ 1/16"]


def test_errors_are_one_line_with_nonzero_exit(capsys, tmp_path):
    assert main(["info", "mmvp_swn"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Did you mean 'mmvp_swin'" in err and "Traceback" not in err
    assert main(["convert-official", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    assert main(["features", "--model", "mmvp_unet_tiny", "--input", str(tmp_path), "--output", "x.npz",
                 "--random-init"]) == 1
    assert "No NIfTI image" in capsys.readouterr().err


def test_convert_official_then_register_local_and_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BRAINMM_HOME", str(tmp_path / "home"))
    from brainmm.models import _registry

    monkeypatch.setitem(_registry._pretrained_cfgs, "mmvp_unet", dict(_registry._pretrained_cfgs["mmvp_unet"]))
    torch.save({"state_dict": {f"module.{k}": v for k, v in official_state_dict("unet").items()}},
               tmp_path / "unet.pt")
    assert main(["convert-official", str(tmp_path / "unet.pt"), str(tmp_path / "conv")]) == 0  # arch detected
    assert "local-dir:" in capsys.readouterr().out
    assert main(["register-local", str(tmp_path / "conv"), "--name", "mmvp_unet.brainmvp"]) == 0
    model = brainmm.create_model("mmvp_unet.brainmvp", pretrained=True)
    assert model.load_report.source.startswith("local-dir:") and not model.load_report.initialised
    assert main(["list", "--pretrained"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["mmvp_unet.brainmvp"][1:3] == ["local", "yes"]


def test_features_of_a_study_folder_and_a_file(dataset, tmp_path, capsys):
    case = sorted(p for p in dataset.iterdir() if p.is_dir())[0]
    out = tmp_path / "f.npz"
    assert main(["features", "--model", "mmvp_unet_tiny", "--input", str(case), "--output", str(out),
                 "--random-init", "--save-maps"]) == 0
    feats = np.load(out)
    mods = list(feats["modalities"])
    assert len(mods) >= 2 and feats["pooled"].shape == (64,)
    assert feats[f"stage1.{mods[0]}"].shape == (16,) and feats[f"map4.{mods[0]}"].dtype == np.float16
    one = next(case.glob("*-t2w.nii.gz"), None) or next(case.glob("*-t1n.nii.gz"))
    assert main(["features", "--model", "mmvp_unet_tiny", "--input", str(one), "--output", str(out),
                 "--random-init"]) == 0
    assert len(np.load(out)["modalities"]) == 1


def test_synth_and_check_data(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--studies", "2", "--shape", "32", "32", "24"]) == 0
    assert main(["check-data", str(tmp_path / "d"), "--crop", "16", "16", "16"]) == 0
    out = capsys.readouterr().out
    assert "studies: 2" in out and "problems: 0" in out
    victim = next((tmp_path / "d").glob("*/*-t1c.nii.gz"), None) or next((tmp_path / "d").glob("*/*-t2w.nii.gz"))
    victim.write_bytes(b"broken")
    assert main(["check-data", str(tmp_path / "d"), "--crop", "16", "16", "16"]) == 1
    assert victim.name in capsys.readouterr().err


def test_pretrain_command_with_overrides(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(dataset), "--arch", "mmvp_uniformer_tiny", "--out", str(out),
                 "--epochs", "1", "--batch-size", "2", "--accumulation", "1", "--crop", "16", "16", "16",
                 "--num-workers", "0", "--device", "cpu", "--no-progress",
                 "--set", "atlas_size=[32,32,32]", "samples_per_study=2", "lr=1e-4"])
    assert code == 0
    assert f"local-dir:{(out / 'export').resolve()}" in capsys.readouterr().out
    cfg = json.loads((out / "export" / "config.json").read_text())["provenance"]["run_config"]
    assert cfg["lr"] == 1e-4 and cfg["crop_size"] == [16, 16, 16]
    assert main(["pretrain", "--data", str(dataset), "--out", str(out), "--set", "objective.nope=1"]) == 1
    assert "Unknown setting 'objective.nope'" in capsys.readouterr().err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "brainmm", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("list", "info", "convert-official", "download", "features", "synth", "check-data", "pretrain"):
        assert cmd in proc.stdout
