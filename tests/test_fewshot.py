"""Few-shot memory bank: exact nearest neighbours, self-reference, coreset, fp16, files (fusion: test_fusion.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_f32_close, make_tiny_checkpoint

from moeclip.errors import MoECLIPError
from moeclip.model.checkpoint import load_model
from moeclip.model.domain import Domain
from moeclip.model.fewshot import (
    MemoryBank,
    build_bank,
    greedy_coreset,
    model_fingerprint,
    nearest_distance,
    predict_with_bank,
)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_clip_config, tmp_path_factory):
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=5)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 64, 64, generator=g)


def brute_force_patch_map(feats, bank_feats):
    """Explicit loops: per map, per patch, per bank entry; cosine from the definition."""
    n_maps = len(feats)
    n_patches = feats[0].shape[0]
    out = [0.0] * n_patches
    for m in range(n_maps):
        q = feats[m].double().tolist()
        b = bank_feats[m].double().tolist()
        b_norms = [math.sqrt(sum(y * y for y in r)) for r in b]
        for p in range(n_patches):
            f = q[p]
            nf = math.sqrt(sum(x * x for x in f))
            best = math.inf
            for r, nr in zip(b, b_norms):
                cos = sum(x * y for x, y in zip(f, r)) / (nf * nr)
                best = min(best, (1.0 - cos) / 2.0)
            out[p] += best / n_maps
    return torch.tensor(out, dtype=torch.float64)


def test_matches_brute_force(model, images):
    refs, test = images[:2], images[2:3]
    bank = build_bank(model, refs, "thing")
    assert bank.num_references == 2 and bank.num_maps == model.adapter_config.num_maps == 12
    L = bank.grid[0] * bank.grid[1]
    assert all(t.shape == (2 * L, 32) for t in bank.features)
    with torch.inference_mode():
        out = model.encode_image(test, compute_losses=False)
    expected = brute_force_patch_map([f[0] for f in out.seg_features], bank.features)
    # small chunks so that both loops of the chunked product run several times
    got = bank.patch_distances(out.seg_features, chunk_elements=40)[0]
    # float32 chunked products vs float64 brute force: relative to the distances' magnitude (F32_RTOL)
    assert_f32_close(got, expected)
    assert_f32_close(bank.patch_distances(out.seg_features)[0], expected)
    # the map: the domain's blur on the grid, then bilinear upsampling, as the zero-shot map
    from kornia.filters import gaussian_blur2d

    for domain in ("industrial", "medical"):
        k, s = Domain.parse(domain).blur
        grid = expected.float().reshape(1, 1, *bank.grid)
        ref_map = F.interpolate(gaussian_blur2d(grid, (k, k), (s, s)), size=(64, 64), mode="bilinear",
                                align_corners=True)[0, 0]
        got_map = bank.anomaly_map(out.seg_features, out.grid, (64, 64), domain)[0]
        assert_f32_close(got_map, ref_map)  # another blur implementation: float32 of another path


def test_self_reference_is_near_zero_and_others_are_not(model, images):
    bank = build_bank(model, images[:3], "thing")
    text = model.text_features("thing")
    res = predict_with_bank(model, images[:4], text, bank)
    fs = res["few_shot_map"]
    assert fs.shape == (4, 64, 64)
    assert float(fs[:3].abs().max()) < 1e-5
    assert float(fs[3].mean()) > 100 * float(fs[:3].abs().max()) + 1e-4
    # the zero-shot parts are those of the plain model
    plain = model.predict(images[:4], text)
    assert_f32_close(res["anomaly_map"], plain["anomaly_map"])  # maps ~20: relative to their magnitude
    assert_f32_close(res["image_score"], plain["image_score"], scale=1.0)


def test_nearest_distance_chunking_and_range():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(2, 7, 5, generator=g), dim=-1)
    b = F.normalize(torch.randn(13, 5, generator=g), dim=-1)
    full = ((1 - (q @ b.T).amax(-1)) / 2)
    for chunk in (1, 3, 14, 1000):
        assert torch.allclose(nearest_distance(q, b, chunk), full, atol=1e-7)
    assert nearest_distance(-b, b).min() >= 0 and nearest_distance(b, b).max() < 1e-6
    with pytest.raises(MoECLIPError, match="empty"):
        nearest_distance(q, b[:0])


def test_greedy_coreset_toy_set():
    # three tight clusters and one outlier: greedy k-center from row 0 takes the outlier, then one
    # point of each remaining cluster, in farthest-first order
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1],      # cluster A (start)
                        [10.0, 0.0], [10.1, 0.0],                # cluster B
                        [0.0, 5.0], [0.1, 5.0],                  # cluster C
                        [30.0, 30.0]])                           # outlier
    idx = greedy_coreset(pts, 4).tolist()
    assert idx[0] == 0 and idx[1] == 7
    assert {idx[2], idx[3]} & {3, 4} and {idx[2], idx[3]} & {5, 6}

    # against the plain loop on random data
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, 6, generator=g)
    chosen = [0]
    for _ in range(9):
        d = [min(float(((x[i] - x[j]) ** 2).sum()) for j in chosen) for i in range(60)]
        chosen.append(int(np.argmax(d)))
    assert greedy_coreset(x, 10).tolist() == chosen
    assert greedy_coreset(x, 100).tolist() == list(range(60))


def test_bank_size_and_fp16(model, images):
    full = build_bank(model, images[:2], "thing")
    small = build_bank(model, images[:2], "thing", bank_size=20)
    assert all(t.shape[0] == 20 for t in small.features)
    # every coreset entry is one of the full bank's rows
    for a, b in zip(small.features, full.features):
        assert torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-6
    with torch.inference_mode():
        out = model.encode_image(images[2:4], compute_losses=False)
    d_full = full.patch_distances(out.seg_features)
    d_small = small.patch_distances(out.seg_features)
    assert (d_small >= d_full - 1e-6).all()  # a subset can only be farther
    half = build_bank(model, images[:2], "thing", fp16=True)
    assert half.dtype == torch.float16 and half.nbytes * 2 == full.nbytes
    assert torch.allclose(half.patch_distances(out.seg_features), d_full, atol=2e-3)


def test_save_load_round_trip_and_mismatch(model, images, tiny_clip_config, tmp_path):
    bank = build_bank(model, images[:2], "metal nut", references=["a.png", "b.png"], bank_size=30, fp16=True)
    path = bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(MoECLIPError, match="already exists"):
        bank.save(path)
    back = MemoryBank.load(path, model=model)
    assert (back.object, back.num_references, back.image_size, back.grid, back.references, back.bank_size) == \
           ("metal nut", 2, 64, bank.grid, ["a.png", "b.png"], 30)
    assert back.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(back.features, bank.features))

    other = load_model(make_tiny_checkpoint(tiny_clip_config, tmp_path / "other", seed=6))
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(MoECLIPError, match=r"bank\.safetensors: the bank was built with another model"):
        MemoryBank.load(path, model=other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MoECLIPError, match="junk.safetensors"):
        MemoryBank.load(tmp_path / "junk.safetensors")
    with pytest.raises(MoECLIPError, match="not found"):
        MemoryBank.load(tmp_path / "missing.safetensors")


def test_fingerprint_ignores_low_precision_cast(tiny_ckpt):
    a = load_model(tiny_ckpt)
    b = load_model(tiny_ckpt).cast_frozen_weights("bf16")
    assert model_fingerprint(a) == model_fingerprint(b)


def test_reference_banks_from_files_and_folder_round_trip(model, tmp_path):
    from PIL import Image

    from moeclip.data.transforms import preprocess_image
    from moeclip.inference.references import ReferenceBanks, bank_from_images, expand_reference_paths

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"r{i}.png")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in expand_reference_paths(tmp_path)] == ["r0.png", "r1.png", "r2.png"]
    assert [p.name for p in expand_reference_paths(str(tmp_path / "r[01].png"))] == ["r0.png", "r1.png"]
    with pytest.raises(MoECLIPError, match="matches no image"):
        expand_reference_paths(str(tmp_path / "*.jpg"))
    bank = bank_from_images(model, [tmp_path], "nut")
    assert bank.num_references == 3 and bank.references[0].endswith("r0.png")
    # an array gives the same bank as its file
    arr = np.asarray(Image.open(tmp_path / "r0.png"))
    one = bank_from_images(model, [arr], "nut")
    direct = build_bank(model, preprocess_image(Image.open(tmp_path / "r0.png").convert("RGB"), 64)[None], "nut")
    assert all(torch.allclose(a, b) for a, b in zip(one.features, direct.features))
    banks = ReferenceBanks([bank, one.to(dtype=torch.float16)], weight=0.3)
    assert len(banks) == 1 and banks.get("nut") is not None and banks.get("bolt") is None  # same object: replaced
    banks.add(build_bank(model, preprocess_image(Image.open(tmp_path / "r1.png").convert("RGB"), 64)[None],
                         "metal nut/x"))
    files = banks.save(tmp_path / "banks")
    assert sorted(f.name for f in files) == ["metal_nut_x.safetensors", "nut.safetensors"]
    back = ReferenceBanks.load(tmp_path / "banks", model=model, weight=0.3)
    assert {b["object"]: b["references"] for b in back.summary()} == {"nut": 1, "metal nut/x": 1}
    assert back.weight == 0.3 and back.get("nut").dtype == torch.float16
    with pytest.raises(MoECLIPError, match="no memory bank files"):
        ReferenceBanks.load(tmp_path / "nothing")
