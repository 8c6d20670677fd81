"""The three proxy tasks: masking, view construction, templates, InfoNCE, schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import brainmm
from brainmm.pretrain import (
    BrainMVPObjective,
    CrossModalReconstruction,
    ModalityContrastive,
    ModalityTemplates,
    ObjectiveConfig,
    fill_masked,
    info_nce_reference,
    random_block_mask,
)


@pytest.mark.parametrize("ratio", [0.8, 0.875, 0.5])
def test_block_mask_ratio_and_structure(ratio):
    torch.manual_seed(0)
    crop, block = (32, 48, 24), 8
    vis = random_block_mask(4, crop, block, ratio)
    assert vis.shape == (4, 1, *crop) and vis.dtype == torch.bool
    blocks = vis.view(4, 4, block, 6, block, 3, block)
    # every block is all-visible or all-masked
    per_block = blocks.float().mean(dim=(2, 4, 6))
    assert torch.all((per_block == 0) | (per_block == 1))
    n = 4 * 6 * 3
    kept = per_block.flatten(1).sum(1)
    assert torch.all(kept == math.floor(n * (1 - ratio)))
    # a fresh mask per sample and per call
    assert not torch.equal(vis[0], vis[1])
    assert not torch.equal(vis, random_block_mask(4, crop, block, ratio))


def test_block_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by the mask block size 8"):
        random_block_mask(1, (96, 96, 90), 8, 0.8)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_block_mask(1, (16, 16, 16), 8, 1.0)


def test_official_96_crop_has_1728_blocks_and_keeps_345():
    vis = random_block_mask(2, (96, 96, 96), 8, 0.8)
    assert vis.view(2, 12, 8, 12, 8, 12, 8)[:, :, 0, :, 0, :, 0].sum(dim=(1, 2, 3)).tolist() == [345, 345]


def test_template_window_is_normalised_whole_template_at_origin():
    tpl = ModalityTemplates((20, 18, 16))
    with torch.no_grad():
        tpl.weight.copy_(torch.randn_like(tpl.weight) * 3 + 1)
    win = tpl.windows(torch.tensor([2, 5]), torch.tensor([[0, 0, 0], [4, 2, 8]]), (8, 8, 8))
    for row, (m, (a, b, c)) in enumerate([(2, (0, 0, 0)), (5, (4, 2, 8))]):
        t = tpl.weight[m]
        norm = (t - t.min()) / (t.max() - t.min() + 1e-9)
        assert torch.allclose(win[row, 0], norm[a:a + 8, b:b + 8, c:c + 8])
    with pytest.raises(ValueError, match="leaves the atlas grid"):
        tpl.windows(torch.tensor([0]), torch.tensor([[15, 0, 0]]), (8, 8, 8))


def test_source_modality_is_another_present_one():
    present = torch.zeros(500, 8, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    present[torch.rand(500, 8, generator=g) < 0.5] = True
    present[:, 3] = True  # at least one
    present[0] = False
    present[0, 2] = True  # a single-modality study
    modality = torch.multinomial(present.float(), 1, generator=g).squeeze(1)
    source = CrossModalReconstruction.choose_source(present, modality, generator=g)
    single = present.sum(1) == 1
    assert torch.all(source[single] == -1)
    ok = ~single
    assert torch.all(source[ok] != modality[ok])
    assert torch.all(present[ok.nonzero().squeeze(1), source[ok]])
    # uniform among the others: with 3 candidates, each is drawn about a third of the time
    present3 = torch.zeros(3000, 8, dtype=torch.bool)
    present3[:, [0, 2, 4, 6]] = True
    src = CrossModalReconstruction.choose_source(present3, torch.zeros(3000, dtype=torch.long), generator=g)
    counts = torch.bincount(src, minlength=8)[[2, 4, 6]].float() / 3000
    assert torch.all((counts - 1 / 3).abs() < 0.04)


def _batch(b=3, crop=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]][:b]).bool()
    image = torch.rand(b, 8, crop, crop, crop, generator=g) * present[:, :, None, None, None]
    # make each modality slot recognisable: value range offset by 10 * slot index
    image = image + 10 * torch.arange(8).view(1, 8, 1, 1, 1) * present[:, :, None, None, None]
    return {"image": image, "present": present, "origin": torch.tensor([[0, 0, 0], [16, 16, 8], [5, 3, 1]][:b])}


def _objective(cfg: ObjectiveConfig, atlas=(48, 48, 40)):
    torch.manual_seed(0)
    enc = brainmm.create_model("mmvp_uniformer_tiny")
    tpl = ModalityTemplates(atlas)
    with torch.no_grad():
        tpl.weight.normal_()
    return BrainMVPObjective(enc, enc.build_reconstruction_decoder(), tpl, cfg)


def test_views_take_masked_voxels_from_the_right_source():
    obj = _objective(ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0))
    batch = _batch()
    torch.manual_seed(1)
    out = obj(batch, epoch=1, with_preview=True)
    p = out.preview
    m, n = int(p["modality"][0]), int(p["source"][0])
    assert n != m and batch["present"][0, n]
    target, vb, va = p["target"][0, 0], p["view_cross_modal"][0, 0], p["view_template"][0, 0]
    assert torch.equal(target, batch["image"][0, m])
    # visible voxels are the target's; masked voxels are the other modality's (range offset 10 * n)
    from_target_b = vb == target
    assert 0.15 < from_target_b.float().mean() < 0.3
    masked = ~from_target_b
    assert torch.equal(vb[masked], batch["image"][0, n][masked])
    # template view: masked voxels come from the normalised template window of modality m at origin (0, 0, 0)
    window = obj.templates.windows(torch.tensor([m]), torch.tensor([[0, 0, 0]]), (32, 32, 32))[0, 0]
    masked_a = va != target
    assert torch.allclose(va[masked_a], window[masked_a].to(va.dtype))
    assert out.logs["cmr_fallback"] == 1  # the third study has a single modality


def test_warm_up_uses_templates_for_both_views_and_contrastive_starts_late():
    cfg = ObjectiveConfig(template_only_epochs=300, contrastive_start_epoch=1000)
    obj = _objective(cfg)
    batch = _batch()
    out = obj(batch, epoch=300, with_preview=True)
    assert out.logs["cross_modal_on"] == 0.0 and out.logs["contrastive_on"] == 0.0
    assert float(out.logs["loss_contrastive"]) == 0.0
    m = int(out.preview["modality"][0])
    window = obj.templates.windows(torch.tensor([m]), torch.tensor([[0, 0, 0]]), (32, 32, 32))[0, 0]
    vb, target = out.preview["view_cross_modal"][0, 0], out.preview["target"][0, 0]
    masked = vb != target
    assert masked.float().mean() > 0.7 and torch.allclose(vb[masked], window[masked])
    out = obj(batch, epoch=301)
    assert out.logs["cross_modal_on"] == 1.0 and out.logs["contrastive_on"] == 0.0
    out = obj(batch, epoch=1000)
    assert out.logs["contrastive_on"] == 1.0 and float(out.logs["loss_contrastive"]) > 0


def test_total_loss_uses_the_code_weights():
    obj = _objective(ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0))
    out = obj(_batch(), epoch=2)
    expected = 10 * out.logs["loss_template"] + out.logs["loss_cross_modal"] + out.logs["loss_contrastive"]
    assert torch.allclose(out.loss.detach(), expected)


def test_template_and_encoder_receive_gradients():
    obj = _objective(ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0))
    with torch.no_grad():
        obj.templates.weight.zero_()  # official zero init: still gets a gradient through the filled voxels
    out = obj(_batch(), epoch=1)
    out.loss.backward()
    g = obj.templates.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # only template rows of the modalities used in the step get gradient
    used = set(obj.choose_modalities(_batch()["present"])[1].tolist()) | {0, 1, 2, 3}
    for row in range(8):
        if row not in used:
            assert g[row].abs().sum() == 0
    enc_grads = [p.grad for p in obj.encoder.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in enc_grads)
    assert all(p.grad is not None for p in obj.decoder.parameters())


def test_info_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(5, 7, 2, 2, 2, generator=g), torch.randn(5, 7, 2, 2, 2, generator=g)
    for temperature in (1.0, 0.1):
        loss = ModalityContrastive(7, temperature=temperature)(fa, fb)
        za, zb = F.normalize(fa.flatten(1), dim=1), F.normalize(fb.flatten(1), dim=1)
        # by hand: -log(exp(s_ii / t) / sum_j exp(s_ij / t)) in both directions, averaged
        s = za @ zb.t() / temperature
        hand = 0.0
        for i in range(5):
            hand += -(s[i, i] - torch.logsumexp(s[i], 0)) - (s[i, i] - torch.logsumexp(s[:, i], 0))
        assert torch.allclose(loss, hand / 10, atol=1e-5)
        assert torch.allclose(loss, info_nce_reference(fa.flatten(1), fb.flatten(1), temperature), atol=1e-5)
    # identical views with orthogonal samples -> near-zero loss at a low temperature
    eye = torch.eye(4).view(4, 4, 1, 1, 1)
    assert ModalityContrastive(4, temperature=0.01)(eye, eye) < 1e-6


def test_projector_option_and_modality_sampling_modes():
    cfg = ObjectiveConfig(template_only_epochs=0, contrastive_start_epoch=0, projector="mlp", projector_dim=8,
                          modality_sampling="all")
    obj = _objective(cfg)
    batch = _batch()
    out = obj(batch, epoch=1)
    assert out.logs["crops"] == int(batch["present"].sum())  # one row per present modality
    out.loss.backward()
    assert all(p.grad is not None for p in obj.contrastive.projector.parameters())
    obj.config.modality_sampling = "shared"
    sample, modality = obj.choose_modalities(batch["present"])
    assert torch.all(batch["present"][sample, modality])
    with pytest.raises(ValueError, match="modality_sampling"):
        ObjectiveConfig(modality_sampling="every")


def test_fill_masked_broadcasts():
    x, f = torch.ones(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8)
    vis = random_block_mask(2, (8, 8, 8), 4, 0.5)
    out = fill_masked(x, f, vis)
    assert torch.equal(out.bool(), vis)



def test_block_grid_expands_to_the_voxel_mask():
    from brainmm.pretrain import random_block_grid

    torch.manual_seed(3)
    grid = random_block_grid(2, (16, 24, 8), 8, 0.5)
    assert grid.shape == (2, 1, 2, 3, 1) and grid.flatten(1).sum(1).tolist() == [3, 3]
    torch.manual_seed(3)
    voxel = random_block_mask(2, (16, 24, 8), 8, 0.5)
    assert torch.equal(voxel, grid.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4))


@pytest.mark.parametrize("block", [1, 2, 3, 4, 6, 8, 16])
def test_block_grid_expansion_for_every_block_size(block):
    from brainmm.pretrain.masking import expand_block_grid

    grid = torch.rand(2, 1, 3, 2, 4, generator=torch.Generator().manual_seed(block)) > 0.5
    expected = grid.repeat_interleave(block, 2).repeat_interleave(block, 3).repeat_interleave(block, 4)
    assert torch.equal(expand_block_grid(grid, block), expected)


def test_visible_blocks_are_drawn_uniformly():
    # every block is visible with probability keep / n: 4000 draws of 16 blocks keeping 4 -> 1000 per block,
    # binomial sd ~27; a bias towards low/high indices (e.g. a sorted or truncated draw) would show at once
    from brainmm.pretrain import random_block_grid

    g = torch.Generator().manual_seed(0)
    counts = random_block_grid(4000, (16, 16, 16), 4, 0.75, generator=g).flatten(1).sum(0).float()
    assert counts.sum() == 4000 * 16 and torch.all((counts - 1000).abs() < 5 * 27.4)


def test_template_window_gradients_equal_normalising_the_whole_volume():
    torch.manual_seed(0)
    tpl = ModalityTemplates((12, 10, 9))
    with torch.no_grad():
        tpl.weight.copy_(torch.randn_like(tpl.weight))
    modality, origin = torch.tensor([1, 1, 3]), torch.tensor([[0, 0, 0], [4, 2, 1], [2, 2, 5]])
    weights = torch.randn(3, 1, 8, 8, 4)
    (tpl.windows(modality, origin, (8, 8, 4)) * weights).sum().backward()
    ours = tpl.weight.grad.clone()
    tpl.weight.grad = None
    whole = tpl.normalised()
    ref = torch.stack([whole[m, a:a + 8, b:b + 8, c:c + 4] for m, (a, b, c) in zip(modality.tolist(),
                                                                                    origin.tolist())])
    (ref.unsqueeze(1) * weights).sum().backward()
    assert torch.allclose(ours, tpl.weight.grad, atol=1e-6, rtol=1e-5)


def test_template_windows_work_under_torch_compile():
    # the windows' in-place normalisation must stay out of compiled graphs (their saved tensors would be modified)
    tpl = ModalityTemplates((10, 10, 10))
    with torch.no_grad():
        tpl.weight.copy_(torch.randn_like(tpl.weight))
    modality, origin = torch.tensor([0, 2]), torch.tensor([[0, 1, 2], [3, 3, 3]])
    weights = torch.randn(2, 1, 4, 4, 4)

    def loss(t: ModalityTemplates) -> torch.Tensor:
        return (torch.sigmoid(t.windows(modality, origin, (4, 4, 4)) * weights) * 3).sum()

    loss(tpl).backward()
    eager = tpl.weight.grad.clone()
    tpl.weight.grad = None
    torch.compile(loss, backend="aot_eager")(tpl).backward()
    assert torch.allclose(tpl.weight.grad, eager, atol=1e-6)
