"""Fine-tuning (splits, label fractions, a few steps with resume), prediction in the original grid, evaluation and
the demo, through the API and the CLI (tiny encoders, tiny phantoms, CPU)."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import brainmm
from brainmm.cli import main
from brainmm.data.datasets import Study
from brainmm.data.synthetic import synthesize_study, write_synthetic_dataset

SHAPE = (40, 40, 32)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("seg") / "data", 4, SHAPE, seed=5,
                                   kinds=["tumour"] * 4, missing_prob=0.3)


def _studies(n, classes=("a", "b", "c")):
    return [Study(f"s{i:02d}", {"t1": f"/x/s{i}.nii.gz"}, class_label=classes[i % len(classes)]) for i in range(n)]


def test_split_and_label_fraction_are_seeded_nested_and_order_free():
    from brainmm.adapters.datasets import label_fraction_subset, split_studies

    studies = _studies(20)
    train, val = split_studies(studies, 0.25, seed=1)
    train2, val2 = split_studies(studies[::-1], 0.25, seed=1)
    assert [s.study_id for s in val] == [s.study_id for s in val2] and len(val) == 5
    assert {s.study_id for s in train} | {s.study_id for s in val} == {s.study_id for s in studies}
    _, strat = split_studies(studies, 0.2, seed=1, stratify=True)
    assert {s.class_label for s in strat} == {"a", "b", "c"}
    ids = lambda xs: [s.study_id for s in xs]  # noqa: E731
    quarter = label_fraction_subset(train, 0.25, seed=7)
    assert ids(quarter) == ids(label_fraction_subset(list(reversed(train)), 0.25, seed=7))
    assert len(quarter) == math.ceil(0.25 * len(train))
    assert set(ids(quarter)) <= set(ids(label_fraction_subset(train, 0.5, seed=7)))  # nested
    assert ids(quarter) != ids(label_fraction_subset(train, 0.25, seed=8))
    assert len(label_fraction_subset(train, 0.01, seed=0)) == 1
    with pytest.raises(ValueError, match="label fraction"):
        label_fraction_subset(train, 0.0)


def _seg_config(data, out, **kw):
    from brainmm.adapters.finetune import FinetuneConfig

    base = dict(data=str(data), out=str(out), cache_dir=str(out.parent / "cache"), crop_size=(32, 32, 32),
                atlas_size=SHAPE, epochs=2, batch_size=2, samples_per_study=1, val_fraction=0.25, val_every=1,
                modalities=("t1", "flair"), num_workers=0, max_val_studies=1, sw_batch_size=4)
    base.update(kw)
    return FinetuneConfig.demo("seg", **base)


def test_finetune_steps_resume_and_best_export(seg_data, tmp_path):
    from brainmm.adapters.finetune import finetune

    first = finetune(_seg_config(seg_data, tmp_path / "run", max_steps=2), show_progress=False)
    assert first.steps == 2 and (first.best / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000002"
    assert list((tmp_path / "run" / "overlays").glob("*.png"))
    resumed = finetune(_seg_config(seg_data, tmp_path / "run", max_steps=3), resume=True, show_progress=False)
    assert resumed.steps == 3 and len(resumed.history) == 2
    straight = finetune(_seg_config(seg_data, tmp_path / "straight", max_steps=3), show_progress=False)
    a = brainmm.create_segmentation_model(f"local-dir:{resumed.last}").state_dict()
    b = brainmm.create_segmentation_model(f"local-dir:{straight.last}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resuming replays exactly the uninterrupted run
    model = brainmm.create_segmentation_model(f"local-dir:{resumed.best}")
    assert model.pretrained_cfg.input_size == (32, 32, 32) and model.pretrained_cfg.atlas_size == SHAPE
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["train"] == 3 and metrics["data"]["val"] == 1
    assert "dice_ET" in metrics["history"][-1]


def _lps_study(folder, seed=11):
    """One study whose files use a rotated, anisotropic LPS affine; only t1 (flair will be template-filled)."""
    s = synthesize_study(seed, shape=(30, 36, 20), kind="tumour", missing_prob=0.0, modalities=["t1"])
    c, si = np.cos(0.2), np.sin(0.2)
    affine = np.array([[-1.2 * c, 0.9 * si, 0, 20], [-1.2 * si, -0.9 * c, 0, 30], [0, 0, 1.6, -12], [0, 0, 0, 1]])
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(s.images["t1"], affine), folder / f"{folder.name}-t1n.nii.gz")
    nib.save(nib.Nifti1Image(s.label, affine), folder / f"{folder.name}-seg.nii.gz")
    return folder, affine


def test_predict_writes_masks_in_the_original_grid_and_evaluate(tmp_path, capsys):
    study_dir, affine = _lps_study(tmp_path / "data" / "BraTS-LPS-00001-000")
    model = brainmm.create_segmentation_model("mmvp_uniformer_tiny", modalities=["t1", "flair"], labels="brats2023")
    model.pretrained_cfg = model.pretrained_cfg.replace(atlas_size=(48, 48, 40), input_size=(32, 32, 32))
    folder = model.save_pretrained(tmp_path / "model")
    assert main(["predict", "--model", str(folder), "--input", str(study_dir), "--output", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    out = nib.load(str(tmp_path / "pred" / f"{study_dir.name}.nii.gz"))
    ref = nib.load(str(study_dir / f"{study_dir.name}-t1n.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, affine) and out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert rows[0]["template_filled"] == "flair" and rows[0]["modalities_used"] == "t1" and "ET_ml" in rows[0]
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(tmp_path / "data"), "--labels",
                 "brats2023", "--output", str(tmp_path / "metrics.csv")]) == 0
    printed = capsys.readouterr().out
    assert "TC" in printed and "HD95" in printed and (tmp_path / "metrics.csv").is_file()
    # A wrong label scheme is one clear CLI error line.
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--data", str(tmp_path / "data"), "--labels",
                 "brats2021"]) == 1
    assert "use --labels brats2023" in capsys.readouterr().err


def test_cli_classification_finetune_and_missing_modality_table(tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "cls", 6, SHAPE, seed=2)
    out = tmp_path / "run"
    assert main(["finetune", "--task", "cls", "--data", str(data), "--encoder", "mmvp_unet_tiny", "--random-init",
                 "--out", str(out), "--epochs", "1", "--max-steps", "2", "--crop", "32", "32", "32", "--modalities",
                 "t1", "flair", "--no-progress", "--set", "atlas_size=[40,40,32]", "num_workers=0",
                 "batch_size=2"]) == 0
    assert "create_classification_model" in capsys.readouterr().out
    model = brainmm.create_classification_model(f"local-dir:{out / 'best'}")
    assert model.class_names == ("healthy", "stroke", "tumour")
    assert main(["evaluate", "--model", str(out / "best"), "--data", str(data), "--missing-subsets",
                 "--work-dir", str(tmp_path / "work"), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "t1+flair" in table and "\nflair " in table and "accuracy" in table
    assert main(["predict", "--model", str(out / "best"), "--input", str(data), "--output",
                 str(tmp_path / "pred"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 6 and {"p_healthy", "p_stroke", "p_tumour", "predicted"} <= set(rows[0])
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in model.class_names) - 1) < 1e-4


def test_cli_demo_runs_end_to_end_with_tiny_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--pretrain-steps", "2", "--finetune-steps", "2", "--cls-steps", "2",
                 "--pretrain-studies", "4", "--seg-studies", "4", "--cls-studies", "6", "--max-val-studies", "1",
                 "--shape", "40", "40", "32", "--no-progress", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "scratch (random init)" in printed and "CMR + MD + MCL" in printed and "Dice mean" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"scratch", "cmr+md+mcl"}
    assert results["encoders"]["cmr+md+mcl"].startswith("local-dir:")
    for run in results["runs"].values():
        assert run["segmentation"]["steps"] == 2 and run["classification"]["steps"] == 2
