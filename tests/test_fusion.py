"""The fusion rule (numpy) and the banks' leave-one-out normal statistics (tiny model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint

from moeclip.errors import MoECLIPError
from moeclip.model.checkpoint import load_model
from moeclip.model.fewshot import MemoryBank, build_bank, reference_stats
from moeclip.model.fusion import (
    ReferenceStats,
    SignalStats,
    fuse,
    fuse_maps,
    fused_raw,
    robust_stats,
    standardise,
    to_scale,
)


def test_robust_stats_by_hand():
    st = robust_stats([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, |dev| 2 1 0 1 97 -> MAD 1
    assert st.center == 3.0 and st.scale == pytest.approx(1.4826)
    # MAD 0 (more than half the values equal): mean absolute deviation * sqrt(pi / 2)
    st = robust_stats([5.0, 5.0, 5.0, 9.0])
    assert st.center == 5.0 and st.scale == pytest.approx(np.sqrt(np.pi / 2) * 1.0)
    assert robust_stats(np.full((3, 3), 2.0)) == SignalStats(2.0, 1.0)
    assert robust_stats([1.0, np.nan, 3.0]).center == 2.0  # non-finite values ignored
    with pytest.raises(MoECLIPError, match="no finite values"):
        robust_stats([np.nan])
    np.testing.assert_allclose(standardise([4.0, 6.0], SignalStats(2.0, 2.0)), [1.0, 2.0])


def signals(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(6.0, 1.5, (3, 16, 16))
    f = rng.gamma(2.0, 0.02, (3, 16, 16))
    u = rng.gamma(3.0, 0.005, (3, 16, 16))
    ev_z, ev_f = rng.normal(6.0, 1.5, (4, 16, 16)), rng.gamma(2.0, 0.02, (4, 16, 16))  # normal evidence
    return z, f, u, ev_z, ev_f


def test_fuse_is_the_weighted_mean_of_standardised_signals():
    z, f, u, ev_z, ev_f = signals()
    sz, sf = robust_stats(ev_z), robust_stats(ev_f)
    su = SignalStats(float(np.median(u)), 1.4826 * float(np.median(np.abs(u - np.median(u)))))
    want = (0.2 * (z - sz.center) / sz.scale + 0.3 * (f - sf.center) / sf.scale + 0.5 * (u - su.center) / su.scale)
    got = fuse([(z, sz, 0.2), (f, sf, 0.3), (u, None, 0.5)])  # None: the signal's own (batch) statistics
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # only the relative weights matter
    np.testing.assert_allclose(fuse([(z, sz, 2.0), (f, sf, 3.0), (u, None, 5.0)]), want, rtol=1e-12)
    with pytest.raises(MoECLIPError, match="weights"):
        fuse([(z, sz, 0.0), (f, sf, 0.0)])
    with pytest.raises(MoECLIPError, match="weights"):
        fuse([(z, sz, -1.0), (f, sf, 2.0)])


def test_affine_rescaling_of_one_signal_changes_nothing():
    """Any backbone's scale: a x + b (a > 0) of a signal and its evidence gives the same fusion."""
    z, f, u, ev_z, ev_f = signals(1)
    base = fuse([(z, robust_stats(ev_z), 0.5), (f, robust_stats(ev_f), 0.5), (u, None, 1.0)])
    for a, b in ((1e-3, 0.02), (40.0, -7.0)):
        scaled = fuse([(z, robust_stats(ev_z), 0.5), (a * f + b, robust_stats(a * ev_f + b), 0.5),
                       (a * u + b, None, 1.0)])
        np.testing.assert_allclose(scaled, base, rtol=1e-9, atol=1e-9)


def test_weight_zero_and_one_are_single_standardised_signals():
    z, f, _, ev_z, ev_f = signals(2)
    stats = ReferenceStats(robust_stats(ev_z), robust_stats(ev_f))
    z32, f32 = z.astype(np.float32), f.astype(np.float32)
    # w = 0: exactly the zero-shot map (to float32 rounding of values ~6)
    np.testing.assert_allclose(fuse_maps(z32, f32, stats, 0.0), z32, rtol=2e-7)
    # w = 1: the few-shot map alone, written in zero-shot raw units: same ranking as F
    one = fuse_maps(z32, f32, stats, 1.0)
    want = stats.zero_shot.center + stats.zero_shot.scale * (f32 - stats.few_shot.center) / stats.few_shot.scale
    np.testing.assert_allclose(one, want, rtol=1e-6)
    assert (np.argsort(one.ravel(), kind="stable") == np.argsort(f32.ravel(), kind="stable")).mean() > 0.99
    with pytest.raises(MoECLIPError, match="reference-weight"):
        fuse_maps(z32, f32, stats, 1.5)


def test_fused_raw_and_batch_statistics():
    z, f, _, ev_z, ev_f = signals(3)
    stats = ReferenceStats(robust_stats(ev_z), robust_stats(ev_f))
    s = np.array([0.2, 0.6, 0.4], dtype=np.float32)
    maps, scores = fused_raw(z, f, s, stats, 0.4)
    want = to_scale(0.6 * standardise(z, stats.zero_shot) + 0.4 * standardise(f, stats.few_shot), stats.zero_shot)
    np.testing.assert_allclose(maps, want, rtol=1e-6)
    assert maps.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, s)  # the text's image score: the only image-level signal
    # without reference statistics (one reference): the batch's own median / MAD, by hand
    mz, mf = np.median(z), np.median(f)
    dz, df = 1.4826 * np.median(np.abs(z - mz)), 1.4826 * np.median(np.abs(f - mf))
    want_b = mz + dz * (0.6 * (z - mz) / dz + 0.4 * (f - mf) / df)
    np.testing.assert_allclose(fused_raw(z, f, s, None, 0.4)[0], want_b, rtol=1e-6)
    assert ReferenceStats.from_json(stats.to_json()) == stats


# ---------------------------------------------------------------------------- leave-one-out statistics
@pytest.fixture(scope="module")
def model(tiny_clip_config, tmp_path_factory):
    return load_model(make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=5))


@pytest.fixture(scope="module")
def refs():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def by_hand_stats(values: np.ndarray):
    m = float(np.median(values))
    return m, 1.4826 * float(np.median(np.abs(values - m)))


def test_reference_stats_are_leave_one_out(model, refs):
    bank = build_bank(model, refs, "screw")
    text = model.text_features("screw")
    # zero-shot: the references' own maps
    zs = model.predict(refs, text)["anomaly_map"].numpy()
    # few-shot: each reference against a bank of the other two, as a test image against a bank
    fs = []
    for k in range(3):
        others = build_bank(model, refs[[j for j in range(3) if j != k]], "screw")
        with torch.inference_mode():
            out = model.encode_image(refs[k:k + 1], compute_losses=False)
            fs.append(others.anomaly_map([f.float() for f in out.seg_features], out.grid, (64, 64))[0].numpy())
    fs = np.stack(fs)
    assert fs.min() > 1e-4  # never compared with itself
    for got, values in ((bank.stats.zero_shot, zs), (bank.stats.few_shot, fs)):
        c, s = by_hand_stats(values)
        assert got.center == pytest.approx(c, rel=1e-5) and got.scale == pytest.approx(s, rel=1e-4)
    assert bank.stats.domain == "industrial"
    # medical smoothing: other statistics, measured again from the bank's own features
    industrial = bank.stats
    med = bank.normal_stats(model, text, "medical")
    assert med.domain == "medical" and med.zero_shot != industrial.zero_shot
    # one reference: no leave-one-out possible; the fusion then uses the batch's statistics
    assert build_bank(model, refs[:1], "screw").stats is None
    L = bank.grid[0] * bank.grid[1]
    assert reference_stats([f.reshape(3, L, -1)[:1] for f in bank.features], text, bank.grid, 64) is None


def test_bank_files_keep_the_statistics_and_old_files_still_load(model, refs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    bank = build_bank(model, refs, "screw")
    back = MemoryBank.load(bank.save(tmp_path / "b.safetensors"), model=model)
    assert back.stats == bank.stats
    # a version-1 file (before the statistics): measured again from its features, the same numbers
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "normal_stats"}
        meta["version"] = "1"
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    old = MemoryBank.load(tmp_path / "old.safetensors", model=model)
    assert old.stats is None
    got = old.normal_stats(model, model.text_features("screw"), "industrial")
    for a, b in ((got.zero_shot, bank.stats.zero_shot), (got.few_shot, bank.stats.few_shot)):
        assert a.center == pytest.approx(b.center, rel=1e-5) and a.scale == pytest.approx(b.scale, rel=1e-4)
    # an old coreset bank cannot be measured again: a clear error
    small = build_bank(model, refs, "screw", bank_size=40)
    small.stats = None
    with pytest.raises(MoECLIPError, match="coreset.*rebuild it"):
        small.normal_stats(model, model.text_features("screw"), "industrial", source="old.safetensors")
    # broken statistics metadata: named
    meta["normal_stats"] = json.dumps({"zero_shot": {"center": 1.0}})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(MoECLIPError, match="bad.safetensors: memory bank metadata is incomplete"):
        MemoryBank.load(tmp_path / "bad.safetensors")
