"""The pre-training loop: exact resume, DDP sharding, torchrun with gloo, config handling, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import brainmm
from brainmm.data.synthetic import write_synthetic_dataset
from brainmm.pretrain.config import PretrainConfig
from brainmm.pretrain.objectives import ObjectiveConfig
from brainmm.pretrain.trainer import ResumableSampler, cosine_lr_lambda, pretrain


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", n_studies=6, shape=(32, 32, 32), seed=3)


def _config(out: Path, data: Path, **kw) -> PretrainConfig:
    base = dict(arch="mmvp_uniformer_tiny", data=str(data), out=str(out), cache_dir=str(out.parent / "cache"),
                crop_size=(16, 16, 16), atlas_size=(32, 32, 32), epochs=3, batch_size=2, accumulation=2, lr=1e-3,
                warmup_steps=1, grad_clip=1.0, num_workers=0, samples_per_study=2, log_every=1, preview_every=2,
                checkpoint_every=2, device="cpu",
                objective=ObjectiveConfig(template_only_epochs=1, contrastive_start_epoch=2, projector="mlp",
                                          projector_dim=8))
    base.update(kw)
    return PretrainConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path):
    full = pretrain(_config(tmp_path / "full", tiny_data), show_progress=False)
    part = pretrain(_config(tmp_path / "part", tiny_data, max_steps=3), show_progress=False)
    first = _weights(part)
    resumed = pretrain(_config(tmp_path / "part", tiny_data), resume=True, show_progress=False)
    a, b = _weights(full), _weights(resumed)
    assert set(a) == set(b)
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the interrupted run really stopped early
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = 3 * (12 // 2 // 2)  # epochs x (6 studies x 2 crops / batch 2 / accumulation 2)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["provenance"]["optimizer_steps"] == steps
    # the run folder holds checkpoints, TensorBoard logs, previews and the export
    run = tmp_path / "full"
    assert (run / "checkpoints" / "latest").read_text() == f"step-{steps:08d}"
    assert len(list((run / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "previews").glob("*-views.png")) and list((run / "previews").glob("*-templates.png"))
    assert not list((run / "checkpoints").glob(".step-*"))  # no temp folders left behind


def test_export_is_a_loadable_encoder_with_templates_and_decoder(tiny_data, tmp_path):
    export = pretrain(_config(tmp_path / "run", tiny_data, epochs=1), show_progress=False)
    encoder = brainmm.create_model(f"local-dir:{export}").eval()
    assert encoder.load_report.initialised == []
    assert set(encoder.load_report.extras) == {"templates", "decoder"}
    templates = brainmm.load_templates(export)
    assert list(templates) == list(brainmm.MODALITIES)
    assert all(t.shape == (32, 32, 32) for t in templates.values())
    decoder = brainmm.load_decoder(export, encoder)
    x = torch.rand(1, 1, 16, 16, 16)
    assert decoder(encoder.forward_features(x)).shape == x.shape
    config = json.loads((export / "config.json").read_text())
    assert config["provenance"]["data"]["studies"] == 6
    assert config["provenance"]["run_config"]["arch"] == "mmvp_uniformer_tiny"
    card = (export / "README.md").read_text()
    assert "Pre-trained with `brainmm pretrain`" in card and (export / "templates.png").is_file()
    # a 4-modality downstream encoder derives its stem from the pre-trained one
    four = brainmm.create_model(f"local-dir:{export}", modalities=["t1", "t1c", "t2", "flair"])
    assert "1 -> 4 channels" in next(iter(four.load_report.adapted.values()))


@pytest.mark.parametrize("arch", brainmm.list_models("*_tiny"))
def test_training_reduces_the_reconstruction_loss(arch, tiny_data, tmp_path):
    """Every encoder family trains: four epochs of the template task lower the loss (the loop really optimises)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path / "run", tiny_data, arch=arch, crop_size=(32, 32, 32), epochs=4, accumulation=1,
                  preview_every=1000, objective=ObjectiveConfig(template_only_epochs=100, contrastive_start_epoch=100))
    pretrain(cfg, show_progress=False)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss_template")]
    assert len(losses) == 4 * 6
    assert sum(losses[-6:]) / 6 < 0.9 * sum(losses[:6]) / 6


def test_sampler_same_order_disjoint_shards_and_resume_offset():
    data = list(range(23))
    shards = []
    for rank in range(2):
        s = ResumableSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7, drop_last=True)
        s.set_epoch(3)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 11
    assert not set(shards[0]) & set(shards[1])
    s = ResumableSampler(data, num_replicas=2, rank=0, shuffle=True, seed=7, drop_last=True)
    s.set_epoch(3)
    s.start = 4
    assert list(s) == shards[0][4:] and len(s) == 7


def test_cosine_schedule_with_warmup():
    fn = cosine_lr_lambda(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert fn(0) == 0.5 and fn(1) == 1.0
    assert abs(fn(2) - 1.0) < 1e-9 and abs(fn(10) - 0.1) < 1e-9
    assert all(fn(i) >= fn(i + 1) for i in range(2, 10))


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("arch: mmvp_unet_tiny\nepochs: 7\nobjective:\n  mask_ratio: 0.875\n")
    cfg = PretrainConfig.from_yaml(path)
    assert cfg.arch == "mmvp_unet_tiny" and cfg.objective.mask_ratio == 0.875 and cfg.lr == 3e-4
    cfg = cfg.with_overrides(["objective.contrastive_start_epoch=5", "lr=1e-4", "crop_size=[32, 32, 32]"])
    assert cfg.objective.contrastive_start_epoch == 5 and cfg.lr == 1e-4 and cfg.crop_size == (32, 32, 32)
    with pytest.raises(ValueError, match="Unknown setting 'objective.mask'"):
        cfg.with_overrides(["objective.mask=0.5"])
    with pytest.raises(ValueError, match="key=value"):
        cfg.with_overrides(["lr"])
    with pytest.raises(ValueError, match="divisible by the mask block size"):
        cfg.with_overrides({"crop_size": [36, 32, 32]})
    assert cfg.with_overrides(["depthwise=triton"]).depthwise == "triton"
    with pytest.raises(ValueError, match="depthwise must be one of torch, triton, got 'cudnn'"):
        cfg.with_overrides(["depthwise=cudnn"])
    path.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="Unknown pre-training setting"):
        PretrainConfig.from_yaml(path)
    assert len(cfg.digest()) == 16 and cfg.digest() != PretrainConfig().digest()


@pytest.mark.slow
def test_torchrun_two_processes_with_gloo(tiny_data, tmp_path):
    """Two CPU processes through torchrun: DDP with gloo, rank-sharded cache build, one export."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "brainmm", "pretrain", "--data", str(tiny_data), "--arch", "mmvp_unet_tiny", "--out", str(out),
           "--epochs", "2", "--batch-size", "2", "--accumulation", "1", "--crop", "16", "16", "16",
           "--num-workers", "0", "--device", "cpu", "--no-progress",
           "--set", "atlas_size=[32,32,32]", "samples_per_study=2", "objective.contrastive_start_epoch=1",
           "objective.gather_negatives=true", "objective.template_only_epochs=1", "checkpoint_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Exported the pre-trained encoder") == 1  # rank 0 only
    encoder = brainmm.create_model(f"local-dir:{out / 'export'}")
    assert encoder.load_report.initialised == []
    steps = json.loads((out / "export" / "config.json").read_text())["provenance"]["optimizer_steps"]
    assert steps == 2 * (12 // 2 // 2)  # each rank sees half of the 12 crops per epoch


def test_bad_data_is_refused_before_training(tmp_path):
    data = write_synthetic_dataset(tmp_path / "syn", n_studies=3, shape=(32, 32, 32), seed=4)
    victim = sorted(data.glob("*/*.nii.gz"))[0]
    victim.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="problem.*brainmm check-data"):
        pretrain(_config(tmp_path / "run", data), show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unpreprocessable_study_is_skipped_and_counted(tmp_path, caplog):
    """A study whose values cannot be preprocessed (headers fine) is skipped with a warning and counted; a cache
    entry that becomes unreadable mid-run is skipped and counted too, never silently."""
    import nibabel as nib
    import numpy as np

    data = write_synthetic_dataset(tmp_path / "syn", n_studies=4, shape=(32, 32, 32), seed=5)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    for f in case.glob("*.nii.gz"):
        if "seg" not in f.name:
            img = nib.load(f)
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), f)  # all background
    cfg = _config(tmp_path / "run", data, epochs=1)
    with caplog.at_level("WARNING"):
        export = pretrain(cfg, show_progress=False)
    summary = json.loads((export / "config.json").read_text())["provenance"]["data"]
    assert summary["studies"] == 3 and summary["skipped_studies"] == 1
    assert any("skipping study" in r.message for r in caplog.records)

    from brainmm.data.cache import MultiModalCropDataset, PreprocessedCache
    from brainmm.data.datasets import discover_studies

    studies = [s for s in discover_studies(data) if s.study_id != case.name]
    cache = PreprocessedCache(tmp_path / "cache", brainmm.get_pretrained_cfg(cfg.arch).replace(atlas_size=(32,) * 3))
    dataset = MultiModalCropDataset(cache, studies, (16, 16, 16))
    broken = cache.root / f"{dataset.entries[0][0]}.npy"
    broken.write_bytes(b"truncated")
    sample = dataset[0]
    assert sample["skipped"] == 1 and sample["study_id"] == dataset.entries[1][1]["study_id"]
