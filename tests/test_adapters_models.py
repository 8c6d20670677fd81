"""Segmentation and classification adapters on every encoder: shapes, stems, SwinUNETR compatibility, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import brainmm
from brainmm.adapters import ClassificationModel, SegmentationModel, SwinUNETRSegmentation, param_groups

TINY = brainmm.list_models("*_tiny")
MODS = ["t1", "t1c", "t2", "flair"]


def _shape(model) -> tuple[int, int, int]:
    # The smallest input every encoder takes whose bottleneck still has > 1 voxel (instance norm needs it).
    d = max(32, model.size_divisor)
    return (2 * d, d, d)


@pytest.mark.parametrize("name", TINY)
def test_segmentation_shapes_and_deep_supervision(name):
    model = brainmm.create_segmentation_model(name, modalities=MODS, labels="brats2023")
    assert isinstance(model, SegmentationModel) and model.num_classes == 3
    assert model.in_chans == 4 and model.modalities == ("t1", "t1c", "t2", "flair")
    x = torch.randn(1, 4, *_shape(model))
    outs = model(x, return_aux=True)
    s = x.shape[2:]
    assert [tuple(o.shape) for o in outs] == [(1, 3, *s), (1, 3, *(v // 2 for v in s)), (1, 3, *(v // 4 for v in s))]
    sum(o.float().mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())  # every head and skip is used (DDP-safe)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 3, *s)


@pytest.mark.parametrize("name", TINY)
def test_classification_shapes_and_modes(name):
    model = brainmm.create_classification_model(name, modalities=["t1", "flair"], class_names=["a", "b", "c"])
    assert isinstance(model, ClassificationModel)
    x = torch.randn(2, 2, *(max(32, model.size_divisor),) * 3)
    assert model(x).shape == (2, 3)
    model.set_finetune_mode("freeze").train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not model.encoder.training and model.head.training  # frozen encoder keeps inference-mode norms
    groups = param_groups(model, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.head.parameters()))
    with pytest.raises(ValueError, match="linear head"):
        model.set_finetune_mode("linear_probe")


def test_layer_decay_scales_follow_stages():
    model = brainmm.create_classification_model("mmvp_uniformer_tiny", modalities=["t1"], num_classes=2)
    groups = param_groups(model, 1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(model.encoder.patch_embed1.proj.weight)] == 0.5 ** 4  # stage 1 of 4
    assert scale_of[id(model.encoder.blocks3[0].attn.qkv.weight)] == 0.5 ** 2
    assert scale_of[id(model.encoder.norm.weight)] == 0.5
    assert all(scale_of[id(p)] == 1.0 for p in model.head.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_decoder_choice_and_errors():
    assert isinstance(brainmm.create_segmentation_model("mmvp_swin_tiny", modalities=MODS, num_classes=2),
                      SwinUNETRSegmentation)
    unetr = brainmm.create_segmentation_model("mmvp_swin_tiny", modalities=MODS, num_classes=2, decoder="unetr")
    assert not isinstance(unetr, SwinUNETRSegmentation)
    with pytest.raises(ValueError, match="4-stage Swin"):
        brainmm.create_segmentation_model("mmvp_uniformer_tiny", modalities=MODS, num_classes=2, decoder="swinunetr")
    with pytest.raises(ValueError, match="contradicts labels"):
        brainmm.create_segmentation_model("mmvp_unet_tiny", modalities=MODS, num_classes=4, labels="brats2023")
    with pytest.raises(ValueError, match="modalities"):
        brainmm.create_segmentation_model("mmvp_unet_tiny", num_classes=2)


def test_swinunetr_weight_compatibility():
    from monai.networks.nets import SwinUNETR

    # Full size: identical keys and shapes, strict load.
    ours = brainmm.create_segmentation_model("mmvp_swin", modalities=MODS, labels="brats2023")
    ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=48)
    sd = ours.swinunetr_state_dict()
    assert list(sd) == list(ref.state_dict())
    assert all(sd[k].shape == v.shape for k, v in ref.state_dict().items())
    ref.load_state_dict(sd, strict=True)
    assert set(ours.state_dict()) - set(sd) == {k for k in ours.state_dict() if k.startswith("ds_heads.")}
    # Identical outputs (tiny configuration, so the CPU test stays fast).
    ours = brainmm.create_segmentation_model("mmvp_swin_tiny", modalities=MODS, labels="brats2023").eval()
    ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1),
                    num_heads=(1, 2, 4, 8)).eval()
    ref.load_state_dict(ours.swinunetr_state_dict(), strict=True)
    x = torch.randn(1, 4, 64, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def _encoder_export(tmp_path, modalities=None, templates=True):
    enc = brainmm.create_model("mmvp_uniformer_tiny", modalities=modalities)
    enc.pretrained_cfg = enc.pretrained_cfg.replace(atlas_size=(40, 40, 32))
    tpl = {m: torch.rand(40, 40, 32, generator=torch.Generator().manual_seed(i)) * 5
           for i, m in enumerate(("flair", "t1", "t1c", "t2"))} if templates else None
    return enc, brainmm.save_pretrained(enc, tmp_path / "encoder", templates=tpl)


def test_stem_adapted_by_modality_name(tmp_path):
    enc, folder = _encoder_export(tmp_path)
    w = enc.patch_embed1.proj.weight.detach()
    seg = brainmm.create_segmentation_model(f"local-dir:{folder}", modalities=MODS, labels="brats2023")
    stem = seg.encoder.patch_embed1.proj.weight.detach()
    assert stem.shape[1] == 4 and torch.allclose(stem, w.repeat(1, 4, 1, 1, 1) / 4)
    assert "encoder.patch_embed1.proj.weight" in seg.load_report.adapted
    assert any(k.startswith("embed.") for k in seg.load_report.initialised)
    # A named 2-channel source: each destination channel takes its own modality's kernel, a new one the mean.
    enc2 = brainmm.create_model("mmvp_uniformer_tiny", modalities=["t1", "flair"])
    named = brainmm.save_pretrained(enc2, tmp_path / "named")
    w2 = enc2.patch_embed1.proj.weight.detach()
    cls = brainmm.create_classification_model(f"local-dir:{named}", modalities=["flair", "t2", "t1"], num_classes=2)
    stem = cls.encoder.patch_embed1.proj.weight.detach()
    assert torch.allclose(stem[:, 0], w2[:, 1] * 2 / 3)
    assert torch.allclose(stem[:, 1], w2.mean(1) * 2 / 3)
    assert torch.allclose(stem[:, 2], w2[:, 0] * 2 / 3)


def test_templates_come_from_the_encoder_weight(tmp_path, caplog):
    from brainmm.hub import normalise_template

    _, folder = _encoder_export(tmp_path)
    seg = brainmm.create_segmentation_model(f"local-dir:{folder}", modalities=["t2", "pd"], num_classes=2)
    expected = normalise_template(torch.rand(40, 40, 32, generator=torch.Generator().manual_seed(3)) * 5)
    assert torch.allclose(torch.from_numpy(seg.templates.volumes[0]).float(), expected, atol=1e-3)
    assert seg.templates.missing_templates == ("pd",)  # the export carries flair, t1, t1c, t2 only
    with caplog.at_level("WARNING", logger="brainmm.adapters.missing"):
        scratch = brainmm.create_segmentation_model("mmvp_unet_tiny", modalities=["t2"], num_classes=2)
    assert scratch.templates.missing_templates == ("t2",)
    assert "filled with zeros" in caplog.text


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_save_load_round_trip(tmp_path, kind):
    _, folder = _encoder_export(tmp_path)
    if kind == "segmentation":
        model = brainmm.create_segmentation_model(f"local-dir:{folder}", modalities=["t1", "flair"],
                                                  labels="brats2021", feature_size=8)
        load = brainmm.create_segmentation_model
    else:
        model = brainmm.create_classification_model(f"local-dir:{folder}", modalities=["t1", "flair"],
                                                    class_names=["healthy", "tumour"], head="linear", pool="avgmax")
        load = brainmm.create_classification_model
    model.eval()
    # The method and the package-level function write the same folder.
    out = model.save_pretrained(tmp_path / kind) if kind == "segmentation" else \
        brainmm.save_pretrained(model, tmp_path / kind)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["architecture"] == "mmvp_uniformer_tiny"
    assert config["model_args"]["in_chans"] == 2 and config["pretrained_cfg"]["modalities"] == ["t1", "flair"]
    card = (out / "README.md").read_text()
    assert f"create_{kind}_model" in card and "pipeline_tag: image-" in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "brainmm" and "fine-tuned" in front["tags"] and kind in front["tags"]
    for section in ("## Intended use", "## Preprocessing contract", "## Metrics", "## Limitations", "@software{brainmm",
                    config["provenance"]["sha256"]):
        assert section in card
    loaded = load(f"local-dir:{out}")
    assert type(loaded) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert (loaded.templates.volumes == model.templates.volumes).all()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    if kind == "segmentation":
        assert loaded.label_scheme.name == "brats2021" and loaded.feature_size == 8
    else:
        assert loaded.class_names == ("healthy", "tumour")
    with pytest.raises(ValueError, match=f"create_{kind}_model"):
        brainmm.create_model(f"local-dir:{out}")
    other = brainmm.create_classification_model if kind == "segmentation" else brainmm.create_segmentation_model
    with pytest.raises(ValueError, match=f"holds a {kind} model"):
        other(f"local-dir:{out}", modalities=["t1"], num_classes=2)
    with pytest.raises(ValueError, match="differs from the saved model"):
        load(f"local-dir:{out}", modalities=["t2"])
