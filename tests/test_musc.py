"""MuSc beyond the golden batch: small batches, sampled comparison images, RsCIN, levels, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moeclip.errors import MoECLIPError
from moeclip.model import musc


def brute_msm(Z: np.ndarray, others, interval: float = 0.3) -> np.ndarray:
    """MSM written out in float64 numpy: nearest patch per other image, mean of the smallest share."""
    n = Z.shape[0]
    out = np.zeros(Z.shape[:2])
    for i in range(n):
        refs = [j for j in range(n) if j != i] if others is None else list(others[i])
        near = np.stack([np.sqrt(((Z[i][:, None] - Z[j][None]) ** 2).sum(-1)).min(1) for j in refs], 1)
        k = max(1, int(interval * len(refs)))
        out[i] = np.sort(near, 1)[:, :k].mean(1)
    return out


def unit_features(n: int, patches: int = 9, c: int = 6, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, patches, c, generator=torch.Generator().manual_seed(seed))
    return z / z.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 12])
def test_msm_equals_written_out_rule_every_batch_size(n):
    """From 2 images on, every patch gets a finite score: at least one other image is averaged."""
    z = unit_features(n)
    got = musc.mutual_scoring(z).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, brute_msm(z.double().numpy(), None), rtol=1e-5, atol=1e-6)


def test_msm_pairwise_and_per_image_paths_agree():
    """The full batch computes each pair once (both directions); the per-image loop computes it twice."""
    z = unit_features(9, seed=4)
    every = torch.stack([torch.tensor([j for j in range(9) if j != i]) for i in range(9)])
    np.testing.assert_allclose(musc.mutual_scoring(z).numpy(), musc.mutual_scoring(z, others=every).numpy(),
                               rtol=1e-6, atol=1e-6)
    # a batch whose pair table exceeds the memory budget takes the per-image loop: same numbers
    np.testing.assert_allclose(musc.mutual_scoring(z, chunk_mb=0).numpy(), musc.mutual_scoring(z).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_msm_with_sampled_others_and_tiny_chunks():
    z = unit_features(12, seed=1)
    others = musc.sample_others(12, 4, seed=3)
    got = musc.mutual_scoring(z, others=others, chunk_mb=0).numpy()  # one image per distance block
    np.testing.assert_allclose(got, brute_msm(z.double().numpy(), others.numpy()), rtol=1e-5, atol=1e-6)
    full = musc.mutual_scoring(z).numpy()
    assert not np.allclose(got, full)


def test_sample_others_is_deterministic_and_excludes_self():
    a = musc.sample_others(10, 3, seed=7)
    assert a.shape == (10, 3)
    assert torch.equal(a, musc.sample_others(10, 3, seed=7))
    assert not torch.equal(a, musc.sample_others(10, 3, seed=8))
    for i, row in enumerate(a.tolist()):
        assert i not in row and len(set(row)) == 3 and all(0 <= j < 10 for j in row)
    assert musc.sample_others(10, 9) is None and musc.sample_others(10, None) is None
    with pytest.raises(MoECLIPError, match="at least 1"):
        musc.sample_others(10, 0)


def test_lnamd_is_layernorm_then_zero_padded_mean_then_unit_length():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 3) * 5 + 2
    got = musc.lnamd(tokens, (4, 4), 3)
    fmap = tokens.double().transpose(1, 2).reshape(2, 3, 4, 4)
    mu = fmap.mean(dim=(1, 2, 3), keepdim=True)
    var = fmap.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    fmap = (fmap - mu) / torch.sqrt(var + 1e-5)
    padded = torch.nn.functional.pad(fmap, (1, 1, 1, 1))
    # corners average 4 real values and 5 zeros
    mean = sum(padded[:, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)) / 9
    want = mean.reshape(2, 3, 16).transpose(1, 2)
    want = want / want.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(MoECLIPError, match="odd"):
        musc.lnamd(tokens, (4, 4), 2)


def test_rscin_by_hand():
    cls = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    scores = [0.2, 1.0, 0.6]  # min-max -> 0, 1, 0.5
    # window 1 keeps each image itself; window 2 adds its most similar other image, weighted by similarity
    w2 = np.array([0.8 / 1.8, 1.0 / 1.8, (0.5 + 0.6) / 1.6])
    want = (np.array([0.0, 1.0, 0.5]) + w2) / 2
    np.testing.assert_allclose(musc.rscin(scores, cls, (1, 2)).numpy(), want, rtol=1e-6)
    # windows beyond the batch are clamped: window 3 and 9 both average all three images
    w3 = (np.array([[1, .8, 0], [.8, 1, .6], [0, .6, 1]]) @ np.array([0, 1, .5])) / np.array([1.8, 2.4, 1.6])
    np.testing.assert_allclose(musc.rscin(scores, cls, (3, 9)).numpy(), w3, rtol=1e-6)
    # equal maxima: nothing stands out, score 0 (not the official NaN); window 0: scores unchanged
    np.testing.assert_array_equal(musc.rscin([0.3, 0.3, 0.3], cls).numpy(), np.zeros(3))
    np.testing.assert_allclose(musc.rscin(scores, cls, (0,)).numpy(), scores, rtol=1e-7)


def test_levels_defaults_and_range():
    assert musc.default_levels(24) == [6, 12, 18, 24]
    assert musc.default_levels(12) == [3, 6, 9, 12]
    assert musc.default_levels(4) == [1, 2, 3, 4]
    assert musc.check_levels([4, 2, 2], 4) == [2, 4]
    with pytest.raises(MoECLIPError, match=r"outside 1\.\.4"):
        musc.check_levels([6, 12, 18, 24], 4)


@pytest.fixture(scope="module")
def tiny_musc(tiny_clip_config):
    torch.manual_seed(0)
    return musc.MuSc.from_options(str(tiny_clip_config), None, image_size=64)


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_two_images_score_finite_and_one_image_is_refused(tiny_musc):
    res = tiny_musc.score_tensors(batch(2))
    assert res.maps.shape == (2, 64, 64) and res.batch_size == 2
    assert torch.isfinite(res.maps).all() and torch.isfinite(res.scores).all()
    assert tiny_musc.levels == [1, 2, 3, 4]
    with pytest.raises(MoECLIPError, match="at least 2 images.*drop --transductive"):
        tiny_musc.score_tensors(batch(1))


def test_mutual_images_is_deterministic_and_bounded(tiny_clip_config, tiny_musc):
    images = batch(7, seed=1)
    sampled = musc.MuSc(tiny_musc.clip, mutual_images=2, seed=5)
    a, b = sampled.score_tensors(images), sampled.score_tensors(images)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)
    full = tiny_musc.score_tensors(images)
    assert not torch.allclose(a.maps, full.maps)
    # M >= N - 1 is the full comparison
    every = musc.MuSc(tiny_musc.clip, mutual_images=6).score_tensors(images)
    torch.testing.assert_close(every.maps, full.maps, rtol=0, atol=1e-6)


def test_flops_count_each_full_pair_once():
    # 2 K L^2 C per level and degree: K = (N - 1) / 2 for a full batch (pairs shared), M when sampled
    assert musc.flops_per_image(9, None, 4, 2, 1, 1) == 2 * 4 * 16 * 2
    assert musc.flops_per_image(9, 3, 4, 2, 2, 3) == 2 * 3 * 16 * 2 * 6
    assert musc.flops_per_image(9, 8, 4, 2, 1, 1) == musc.flops_per_image(9, None, 4, 2, 1, 1)
