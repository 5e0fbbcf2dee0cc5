"""Unit tests of the paper's components: FOFS, ETF loss, PAA, router, experts, trainable set."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_f32_close

from moeclip.errors import MoECLIPError
from moeclip.model.backbone import create_clip
from moeclip.model.config import AdapterConfig, BackboneConfig
from moeclip.model.experts import LoRAExperts
from moeclip.model.fofs import feature_chunks, fofs_down_projections
from moeclip.model.losses import (
    balance_loss,
    etf_loss,
    etf_loss_from_gram,
    segmentation_loss,
    segmentation_losses,
    segmentation_losses_from_gap,
)
from moeclip.model.moeclip import MoECLIP
from moeclip.model.paa import patch_average, patch_average_radii
from moeclip.model.router import Router
from moeclip.model.scoring import segmentation_gap, segmentation_probs


# ----------------------------------------------------------------------------- FOFS
@pytest.mark.parametrize("width,experts,rank", [(64, 4, 8), (1024, 4, 8), (70, 4, 8), (30, 3, 4)])
def test_fofs_block_support_and_orthonormal_rows(width, experts, rank):
    A = fofs_down_projections(width, experts, rank, torch.Generator().manual_seed(0))
    chunks = feature_chunks(width, experts)
    sizes = [c.stop - c.start for c in chunks]
    assert sum(sizes) == width and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first width % E chunks are one larger
    for e, chunk in enumerate(chunks):
        outside = torch.ones(width, dtype=torch.bool)
        outside[chunk] = False
        assert A[e][:, outside].abs().max() == 0
        rows = A[e][:, chunk]
        torch.testing.assert_close(rows @ rows.T, torch.eye(rank), atol=1e-5, rtol=0)
    # different experts read disjoint features, so their row spaces are orthogonal
    for a, b in itertools.combinations(range(experts), 2):
        assert (A[a] @ A[b].T).abs().max() < 1e-6


def test_fofs_is_frozen_and_plain_lora_trains():
    frozen = LoRAExperts(64, 4, 8, 16, fofs=True)
    plain = LoRAExperts(64, 4, 8, 16, fofs=False)
    assert not frozen.lora_A.requires_grad and frozen.lora_B.requires_grad
    assert plain.lora_A.requires_grad
    assert frozen.lora_B.abs().max() == 0  # B starts at zero: untrained experts output zero


def test_fofs_too_narrow_is_a_clear_error():
    with pytest.raises(MoECLIPError, match="FOFS"):
        fofs_down_projections(16, 4, 8)


# ----------------------------------------------------------------------------- experts
def test_mixed_experts_equal_the_routed_sum():
    torch.manual_seed(0)
    ex = LoRAExperts(32, 4, 4, 8.0, fofs=True)
    torch.nn.init.normal_(ex.lora_B)
    router = Router(32, 4, 2)
    torch.nn.init.normal_(router.gate.weight)
    x = torch.randn(50, 32)
    r = router(x)
    h = ex.down(x)
    got = ex.mix(h, router.dense_weights(r))
    ref = torch.zeros(50, 32)
    for n in range(50):
        for k in range(2):
            e = r.indices[n, k]
            ref[n] += r.weights[n, k] * (ex.lora_B[e] @ (ex.lora_A[e] @ x[n])) * ex.scaling
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.all_outputs(h)[:, 1], (x @ ex.lora_A[1].T @ ex.lora_B[1].T) * ex.scaling,
                               atol=1e-5, rtol=1e-5)


def _dropout_reference(ex: LoRAExperts, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per expert, the full-width formula ``A_e (mask_e * x / (1 - p))`` written out."""
    return torch.stack([(x * masks[e] / (1 - ex.dropout)) @ ex.lora_A[e].T for e in range(ex.num_experts)], 1)


def test_fofs_lora_dropout_on_each_experts_chunk_is_the_full_width_dropout():
    """With FOFS, expert e reads only its chunk, so drawing the dropout mask on the chunk alone gives
    what a full-width mask gives (mask values outside the chunk meet zeros of A)."""
    torch.manual_seed(3)
    ex = LoRAExperts(32, 4, 4, 8.0, dropout=0.3, fofs=True).train()
    x = torch.randn(50, 32)
    torch.manual_seed(11)
    h = ex.down(x)
    torch.manual_seed(11)
    chunk_keep = F.dropout(torch.ones(50, 4, 8), 0.3, True) > 0  # the same draws: one mask per (token, expert, chunk)
    masks = torch.zeros(4, 50, 32)
    for e in range(4):
        masks[e, :, 8 * e:8 * (e + 1)] = chunk_keep[:, e].float()
        masks[e, :, :8 * e] = torch.randint(0, 2, (50, 8 * e)).float()  # anything outside the chunk
    torch.testing.assert_close(h, _dropout_reference(ex, x, masks), atol=1e-5, rtol=1e-5)
    kept = chunk_keep.float().mean().item()
    assert 0.6 < kept < 0.8  # p = 0.3 per element


def test_lora_dropout_falls_back_to_full_width_masks_when_A_is_not_block_diagonal():
    torch.manual_seed(4)
    uneven = LoRAExperts(34, 4, 4, 8.0, dropout=0.3, fofs=True).train()  # chunks 9, 9, 8, 8
    plain = LoRAExperts(32, 4, 4, 8.0, dropout=0.3, fofs=False).train()  # dense, trained A
    loaded = LoRAExperts(32, 4, 4, 8.0, dropout=0.3, fofs=True).train()
    assert loaded._diagonal_blocks() is not None
    with torch.no_grad():
        loaded.lora_A[0, 0, 31] = 0.5  # e.g. a checkpoint whose A is not FOFS-shaped
    for ex in (uneven, plain, loaded):
        assert ex._diagonal_blocks() is None
        x = torch.randn(20, ex.lora_A.shape[-1])
        torch.manual_seed(12)
        h = ex.down(x)
        torch.manual_seed(12)
        keep = F.dropout(torch.ones(ex.num_experts, *x.shape), 0.3, True) > 0
        torch.testing.assert_close(h, _dropout_reference(ex, x, keep.float()), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- router
def test_router_topk_weights_renormalised():
    torch.manual_seed(1)
    router = Router(16, 5, 3)
    torch.nn.init.normal_(router.gate.weight)
    r = router(torch.randn(4, 7, 16))
    assert r.probs.dtype == torch.float32
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(4, 7))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(4, 7))
    top = r.probs.topk(3, dim=-1)
    assert torch.equal(r.indices, top.indices)
    torch.testing.assert_close(r.weights, top.values / top.values.sum(-1, keepdim=True))
    dense = router.dense_weights(r)
    assert ((dense > 0).sum(-1) == 3).all()


def test_router_starts_uniform():
    r = Router(8, 4, 2)(torch.randn(3, 8))
    torch.testing.assert_close(r.probs, torch.full((3, 4), 0.25))


# ----------------------------------------------------------------------------- ETF / balance
def simplex_etf(E: int, d: int) -> torch.Tensor:
    """E unit vectors with pairwise cosine -1/(E-1): centred one-hot vectors, padded to d."""
    v = torch.eye(E) - 1.0 / E
    v = F.normalize(v, dim=-1)
    return F.pad(v, (0, d - E))


def test_etf_loss_zero_on_simplex_positive_otherwise():
    etf = simplex_etf(4, 16).unsqueeze(0).repeat(5, 1, 1)
    Q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert etf_loss(etf) < 1e-10
    assert etf_loss(etf @ Q * 3.0) < 1e-10  # rotation- and scale-invariant
    same = torch.randn(5, 1, 16).repeat(1, 4, 1)
    assert etf_loss(same) > 0.5
    x = torch.randn(5, 4, 16, requires_grad=True)
    loss = etf_loss(x)
    assert loss > 0
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _etf_by_normalising(outs: torch.Tensor) -> torch.Tensor:
    """The ETF loss as the reference writes it: normalise the (N, E, d) outputs, then their Gram matrix."""
    z = F.normalize(outs, dim=-1, eps=1e-6)
    E = outs.shape[1]
    target = torch.full((E, E), -1.0 / (E - 1), dtype=outs.dtype)
    target.fill_diagonal_(1.0)
    return ((z @ z.transpose(1, 2) - target) ** 2).mean()


def test_etf_from_the_experts_gram_equals_normalising_their_outputs():
    """``output_gram`` (never materialising the outputs) + ``etf_loss_from_gram`` against the reference:
    the same loss and the same gradients for lora_B, also with some experts silent (zero outputs)."""
    torch.manual_seed(8)
    ex = LoRAExperts(32, 4, 4, 8.0, fofs=True)
    torch.nn.init.normal_(ex.lora_B)
    with torch.no_grad():
        ex.lora_B[2] = 0  # an untrained expert: zero outputs, as every expert at initialisation
    h = ex.down(torch.randn(40, 32))
    ref = _etf_by_normalising(ex.all_outputs(h))
    (g_ref,) = torch.autograd.grad(ref, ex.lora_B)
    got = etf_loss_from_gram(ex.output_gram(h))
    (g_got,) = torch.autograd.grad(got, ex.lora_B)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-5 * g_ref.abs().max().item())
    torch.testing.assert_close(etf_loss(ex.all_outputs(h)), ref, rtol=1e-5, atol=1e-7)


def test_balance_loss():
    uniform = torch.full((10, 4), 0.25)
    assert balance_loss(uniform) < 1e-10
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(10, 1)
    s = skewed.sum(0)
    assert torch.isclose(balance_loss(skewed), (s.std() / (s.mean() + 1e-6)) ** 2)


# ----------------------------------------------------------------------------- PAA
@pytest.mark.parametrize("grid", [(5, 6), (20, 17)])  # the one-matmul path and the per-radius path
def test_paa_all_radii_at_once_equal_avg_pool(grid):
    torch.manual_seed(4)
    H, W = grid
    patches = torch.randn(3, 2, H * W, 8)  # (levels, B, L, C)
    out = patch_average_radii(patches, grid, [1, 3, 5])
    assert out.shape == (3, 2, 3, H * W, 8)
    g = patches.reshape(6, H, W, 8).permute(0, 3, 1, 2)
    for k, r in enumerate([1, 3, 5]):
        ref = F.avg_pool2d(g, r, stride=1, padding=r // 2, count_include_pad=True)
        ref = ref.permute(0, 2, 3, 1).reshape(3, 2, H * W, 8)
        # one matmul (or a depthwise convolution) vs avg_pool2d: sums in another order, float32 relative to
        # the values' magnitude
        assert_f32_close(out[:, :, k], ref)


def test_stacked_segmentation_losses_equal_one_map_at_a_time():
    torch.manual_seed(5)
    probs = torch.rand(12, 2, 2, 16, 16).softmax(2)
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    stacked = segmentation_losses(probs, mask)

    def reference(p, smooth=1e-5):  # the per-map formulas written out (focal on flattened pixels, Dice per image)
        q = p.permute(0, 2, 3, 1).reshape(-1, 2)
        one_hot = F.one_hot(mask.reshape(-1).long(), 2).float().clamp(smooth, 1 - smooth)
        pt = (one_hot * q).sum(1) + smooth
        focal = (-((1 - pt) ** 2) * pt.log()).mean()

        def dice(a, t):
            a, t = a.reshape(2, -1), t.reshape(2, -1)
            return 1 - ((2 * (a * t).sum(1) + 1) / (a.sum(1) + t.sum(1) + 1)).mean()
        return focal + dice(p[:, 0], 1 - mask[:, 0]) + dice(p[:, 1], mask[:, 0])

    expected = torch.stack([reference(p) for p in probs])
    torch.testing.assert_close(stacked, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(segmentation_loss(probs[3], mask), expected[3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grid,size,per_image_text", [((8, 8), (64, 64), False), ((5, 7), (33, 50), True),
                                                       ((4, 4), (4, 4), False)])
def test_gap_losses_equal_the_softmax_losses_and_their_gradients(grid, size, per_image_text):
    """The training path (one-channel logit gap, matmul upsampling, sigmoid) against the two-channel
    softmax of ``F.interpolate``-upsampled logits: the same losses and feature gradients."""
    torch.manual_seed(7)
    M, B, D = 3, 2, 16
    feats = F.normalize(torch.randn(M, B, grid[0] * grid[1], D, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(*((B,) if per_image_text else ()), D, 2, dtype=torch.float64), dim=-2)
    mask = (torch.rand(B, 1, *size) > 0.7).double()
    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ref = segmentation_losses(segmentation_probs(f1, text, grid, size), mask)
    gap = segmentation_gap(f2, text, grid, size)
    torch.testing.assert_close(torch.sigmoid(gap), segmentation_probs(feats, text, grid, size)[:, :, 1],
                               atol=1e-12, rtol=0)
    got = segmentation_losses_from_gap(gap.double(), mask)  # the loss computes in float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)
    (ref * torch.arange(1.0, M + 1, dtype=ref.dtype)).sum().backward()
    (got.double() * torch.arange(1.0, M + 1, dtype=ref.dtype)).sum().backward()
    torch.testing.assert_close(f2.grad, f1.grad, rtol=0, atol=1e-5 * f1.grad.abs().max().item())


def test_gap_focal_term_keeps_small_probabilities_in_float32():
    """Saturated maps (logit gaps of +-200, as the logit scale of 100 gives): ``pt`` of a confidently
    wrong pixel is ~2e-5 and must not be lost to cancellation (computed as 1 - p it would be)."""
    gap = torch.tensor([[[[200.0, -200.0], [-200.0, 200.0]]]])  # (M=1, B=1, 2, 2)
    mask = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # two pixels confidently wrong, two right
    probs = torch.stack([torch.sigmoid(-gap.double()), torch.sigmoid(gap.double())], 2)
    ref = segmentation_losses(probs, mask.double())
    torch.testing.assert_close(segmentation_losses_from_gap(gap, mask).double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("radius", [1, 3, 5])
def test_paa_equals_bruteforce_neighbourhood_mean(radius):
    torch.manual_seed(2)
    B, H, W, C = 2, 5, 6, 3
    patches = torch.randn(B, H * W, C)
    out = patch_average(patches, (H, W), radius)
    grid = patches.reshape(B, H, W, C)
    p = radius // 2
    ref = torch.zeros_like(grid)
    for i in range(H):
        for j in range(W):
            acc = torch.zeros(B, C)
            for di in range(-p, p + 1):
                for dj in range(-p, p + 1):
                    if 0 <= i + di < H and 0 <= j + dj < W:
                        acc += grid[:, i + di, j + dj]
            ref[:, i, j] = acc / radius ** 2  # zero padding counts in the mean
    assert_f32_close(out.reshape(B, H, W, C), ref)  # sums in another order: relative to the magnitude
    # the CPU depthwise-convolution path equals avg_pool2d(count_include_pad=True)
    g = patches.transpose(1, 2).reshape(B, C, H, W)
    pooled = torch.nn.functional.avg_pool2d(g, radius, 1, radius // 2, count_include_pad=True)
    assert_f32_close(out, pooled.reshape(B, C, H * W).transpose(1, 2))


def test_blocks_run_sequence_first_and_clip_still_works(tiny_clip_config):
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = clip.encode_image(x)
        model = MoECLIP(clip, AdapterConfig())
        after = clip.encode_image(x)
    assert model.sequence_first and not clip.visual.transformer.batch_first
    assert all(not b.attn.batch_first for b in clip.visual.transformer.resblocks)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def tiny_model(tiny_clip_config):
    torch.manual_seed(0)
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    return MoECLIP(clip, AdapterConfig())


def test_only_adapters_train(tiny_model):
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("clip.") for n in trainable)
    assert not any("lora_A" in n for n in trainable)  # FOFS: A is frozen
    expected_prefixes = ("moe.", "seg_proj.", "det_proj.", "text.adapter.")
    assert all(n.startswith(expected_prefixes) for n in trainable)
    assert any(".router." in n for n in trainable) and any("lora_B" in n for n in trainable)
    tiny_model.train()
    assert tiny_model.training and not tiny_model.clip.training
    assert not any(m.training for m in tiny_model.clip.modules())
    tiny_model.eval()


def test_depth_dependent_defaults(tiny_model):
    cfg = tiny_model.adapter_config
    assert cfg.moe_layers == [0, 1, 2, 3] and cfg.levels == [1, 2, 3, 4]  # quarter points of 4 blocks
    assert AdapterConfig().resolved(24).moe_layers == [5, 11, 17, 23]
    assert AdapterConfig().resolved(24).levels == [6, 12, 18, 24]


def test_no_autograd_before_first_moe_layer(tiny_clip_config):
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    model = MoECLIP(clip, AdapterConfig(moe_layers=[2], levels=[3, 4]))
    seen = []
    for i, blk in enumerate(model.clip.visual.transformer.resblocks):
        blk.register_forward_hook(lambda m, a, o, i=i: seen.append((i, torch.is_grad_enabled())))
    model.train()
    model.compute_losses(torch.randn(2, 3, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([0, 1]),
                         model.text_features("thing"))
    assert dict(seen) == {0: False, 1: False, 2: False, 3: True}


def test_losses_train_mode_vs_released(tiny_clip_config):
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    images, masks, labels = torch.randn(2, 3, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([0, 1])
    paper = MoECLIP(clip, AdapterConfig()).train()
    l1 = paper.compute_losses(images, masks, labels, paper.text_features("x"))
    assert l1["etf"] > 0 and l1["seg"].shape == (12,)
    released = MoECLIP(clip, AdapterConfig(released_training=True)).train()
    l2 = released.compute_losses(images, masks, labels, released.text_features("x"))
    assert l2["etf"] == 0 and l2["balance"] == 0
    assert all(m.experts.dropout == 0 for m in released.moe)


@pytest.mark.parametrize("options", [{}, {"seg_proj": "separate", "relu": True}, {"paa": False},
                                     {"lora_dropout": 0.3}])
def test_grad_checkpoint_gives_same_gradients(tiny_clip_config, options):
    """Blocks, MoE adapters, seg head and loss maps recomputed in backward: same losses and
    gradients (with LoRA dropout too: the recomputation must draw the same masks)."""
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    torch.manual_seed(3)
    model = MoECLIP(clip, AdapterConfig(**{"lora_dropout": 0.0, **options}))
    for m in model.moe:
        torch.nn.init.normal_(m.experts.lora_B, std=0.1)
    images, masks = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.8).float()
    labels = torch.tensor([0, 1])
    grads, losses = [], []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        model.zero_grad()
        model.train()
        torch.manual_seed(11)
        out = model.compute_losses(images, masks, labels, model.text_features("x"))
        out["total"].backward()
        losses.append(out["seg"].detach())
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    assert losses[0].shape == (model.adapter_config.num_maps,)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):  # relative to the tensor's scale: the text gradient sums 12 maps in another order
        assert (a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1e-12)


def test_separate_projections_and_no_paa(tiny_clip_config):
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    sep = MoECLIP(clip, AdapterConfig(seg_proj="separate"))
    assert len(sep.seg_proj) == 12
    nopaa = MoECLIP(clip, AdapterConfig(paa=False))
    out = nopaa.encode_image(torch.randn(1, 3, 64, 64))
    assert len(out.seg_features) == 4 and len(nopaa.seg_proj) == 4


def test_bad_config_errors():
    with pytest.raises(MoECLIPError, match="top_k"):
        AdapterConfig(num_experts=2, top_k=3).resolved(24)
    with pytest.raises(MoECLIPError, match="MoE layer 30"):
        AdapterConfig(moe_layers=[30]).resolved(24)
    with pytest.raises(MoECLIPError, match="seg_proj"):
        AdapterConfig(seg_proj="both").resolved(24)
