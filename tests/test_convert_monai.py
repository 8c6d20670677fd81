"""MONAI SwinUNETR self-supervised weights -> mmvp_swin, checked against MONAI's own loader."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

import brainmm
from brainmm.cli import main
from brainmm.convert import convert_monai_swin, convert_monai_swin_state_dict


def _ssl_checkpoint(prefix: str = "module.", old_mlp_names: bool = True) -> dict[str, torch.Tensor]:
    """The model_swinvit.pt layout, built from MONAI's own module: swinViT keys behind a prefix, timm-era
    ``mlp.fc1/fc2`` names, plus the self-supervised heads that a converter must drop."""
    torch.manual_seed(0)
    swin = SwinUNETR(in_channels=1, out_channels=1, feature_size=48).swinViT
    sd = {}
    for k, v in swin.state_dict().items():
        if old_mlp_names:
            k = k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        sd[prefix + k] = v.clone() + (0.01 * torch.randn_like(v) if v.is_floating_point() else 0)
    sd[prefix + "rotation_head.weight"] = torch.zeros(4, 768)
    sd[prefix + "contrastive_head.weight"] = torch.zeros(512, 768)
    sd[prefix + "conv.0.weight"] = torch.zeros(384, 768, 3, 3, 3)
    return sd


@pytest.mark.parametrize("prefix", ["module.", "module.swin_vit.", "swinViT.", ""])
def test_state_dict_mapping_keeps_every_encoder_key(prefix):
    sd = _ssl_checkpoint(prefix)
    encoder, dropped, unmapped = convert_monai_swin_state_dict(sd)
    assert unmapped == [] and len(dropped) == 3
    assert set(encoder) == set(brainmm.create_model("mmvp_swin").state_dict())


def test_converted_weights_equal_monai_load_from(tmp_path):
    sd = _ssl_checkpoint("module.")
    torch.save({"state_dict": sd, "epoch": 100}, tmp_path / "model_swinvit.pt")
    folder = convert_monai_swin(tmp_path / "model_swinvit.pt", tmp_path / "swin")
    ours = brainmm.create_model(f"local-dir:{folder}").eval()
    # MONAI's own loader is the oracle for what these weights mean
    ref = SwinUNETR(in_channels=1, out_channels=3, feature_size=48).eval()
    ref.load_from({"state_dict": sd})
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours.forward_intermediates(x), ref.swinViT(x, True)):
            assert torch.equal(a, b)
    four = brainmm.create_model(f"local-dir:{folder}", modalities=["t1", "t1c", "t2", "flair"])
    assert "1 -> 4 channels" in four.load_report.adapted["patch_embed.proj.weight"]


def test_cli_convert_monai_swin_rejects_foreign_keys(tmp_path, capsys):
    sd = _ssl_checkpoint("module.")
    sd["module.classifier.weight"] = torch.zeros(2, 768)
    torch.save(sd, tmp_path / "bad.pt")
    assert main(["convert-monai-swin", str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 1
    assert "classifier.weight" in capsys.readouterr().err
    assert main(["convert-monai-swin", str(tmp_path / "bad.pt"), str(tmp_path / "out"), "--allow-unmapped"]) == 0


def test_finetuned_swinunetr_into_the_segmentation_adapter(tmp_path, capsys):
    torch.manual_seed(2)
    ref = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1),
                    num_heads=(1, 2, 4, 8)).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3},
               tmp_path / "swinunetr.pt")
    assert main(["convert-monai-swin", str(tmp_path / "swinunetr.pt"), str(tmp_path / "seg"), "--segmentation",
                 "--modalities", "flair", "t1ce", "t1", "t2", "--labels", "brats2023"]) == 0
    assert "create_segmentation_model" in capsys.readouterr().out
    model = brainmm.create_segmentation_model(f"local-dir:{tmp_path / 'seg'}").eval()
    assert model.modalities == ("flair", "t1c", "t1", "t2")
    x = torch.randn(1, 4, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    assert main(["convert-monai-swin", str(tmp_path / "swinunetr.pt"), str(tmp_path / "x"), "--segmentation",
                 "--modalities", "t1", "t2"]) == 1
    assert "4 input channels" in capsys.readouterr().err
