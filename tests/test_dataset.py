"""Pre-processing, the official joint augmentation, and the ZSAD dataset."""
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from moeclip.data.dataset import ZSADDataset, collate
from moeclip.data.sample import Sample
from moeclip.data.transforms import CLIP_MEAN, CLIP_STD, JointAugment, preprocess_image, preprocess_mask
from moeclip.errors import MoECLIPError

S = 32


def _official_augment():
    """The official training augmentation as written with torchvision v1 transforms."""
    return transforms.Compose([
        transforms.RandomApply([transforms.RandomRotation(degrees=math.degrees(math.pi / 6))], p=0.5),
        transforms.RandomApply([transforms.RandomAffine(degrees=0, translate=(0.15, 0.15))], p=0.5),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomVerticalFlip(p=0.5),
    ])


# ---------------------------------------------------------------------------
# pre-processing
# ---------------------------------------------------------------------------

def test_preprocess_image_matches_torchvision_pipeline():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (23, 41, 3), dtype=np.uint8))
    ref = transforms.Compose([
        transforms.Resize((S, S), Image.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])(img)
    out = preprocess_image(img, S)
    assert out.dtype == torch.float32 and out.shape == (3, S, S)
    assert torch.equal(out, ref)


def test_preprocess_image_accepts_other_modes():
    gray = Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L")
    out = preprocess_image(gray, 8)
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out, preprocess_image(gray.convert("RGB"), 8))


def test_preprocess_mask_matches_official_pipeline():
    rng = np.random.default_rng(1)
    m = rng.random((19, 27)) > 0.7
    pil = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
    ref = (transforms.Compose([transforms.Resize((S, S), Image.NEAREST),
                               transforms.ToTensor()])(pil) != 0).float()
    out = preprocess_mask(m, S)
    assert out.dtype == torch.float32 and out.shape == (1, S, S)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------
# joint augmentation
# ---------------------------------------------------------------------------

def _square_pair(size=S):
    """White square on black, normalised, and the same square as mask."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[8:20, 10:24] = 255
    image = preprocess_image(Image.fromarray(arr), size)
    mask = torch.zeros(1, size, size)
    mask[0, 8:20, 10:24] = 1
    return image, mask


def test_joint_augment_equals_official_transforms_under_global_seed():
    image, mask = _square_pair()
    official, ours = _official_augment(), JointAugment()
    for seed in range(40):
        torch.manual_seed(seed)
        ref = official(torch.cat([image, mask], dim=0))
        torch.manual_seed(seed)
        i, m = ours(image, mask)
        assert torch.equal(torch.cat([i, m]), ref), seed


def test_joint_augment_keeps_image_and_mask_aligned():
    image, mask = _square_pair()
    aug = JointAugment(generator=torch.Generator().manual_seed(0))
    moved = 0
    for _ in range(30):
        params = aug.sample_params(S, S)
        x = aug.apply(torch.cat([image, mask]), params)
        i, m = x[:3], x[3:4]
        assert set(m.unique().tolist()) <= {0.0, 1.0}        # nearest keeps the mask binary
        white = i[0] > 1.0    # white is ~1.9 after normalisation; black ~-1.8; fill 0
        assert torch.equal(white, m[0].bool())
        moved += params.angle is not None or params.translate is not None
    assert moved > 5


def test_joint_augment_fill_is_zero_in_normalised_space():
    image = torch.full((3, S, S), -1.5)
    mask = torch.zeros(1, S, S)
    aug = JointAugment(p_rotate=1.0, p_translate=0.0, p_hflip=0.0, p_vflip=0.0,
                       generator=torch.Generator().manual_seed(5))
    i, _ = aug(image, mask)
    assert (i == 0).any() and (i == -1.5).any()


def test_joint_augment_generator_is_reproducible_and_leaves_global_rng():
    image, mask = _square_pair()
    a = JointAugment(generator=torch.Generator().manual_seed(7))
    b = JointAugment(generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    outs_a = [a(image, mask) for _ in range(10)]
    outs_b = [b(image, mask) for _ in range(10)]
    assert torch.equal(torch.get_rng_state(), before)
    for (ia, ma), (ib, mb) in zip(outs_a, outs_b):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    c = JointAugment(generator=torch.Generator().manual_seed(8))
    outs_c = [c(image, mask) for _ in range(10)]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(outs_a, outs_c))


def test_joint_augment_rejects_size_mismatch():
    with pytest.raises(ValueError):
        JointAugment()(torch.zeros(3, 8, 8), torch.zeros(1, 8, 9))


# ---------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------

def _write_rgb(path, h=24, w=30, value=120):
    arr = np.full((h, w, 3), value, np.uint8)
    arr[4:10, 5:12] = 250
    Image.fromarray(arr).save(path)
    return str(path)


def _write_mask(path, h=24, w=30):
    m = np.zeros((h, w), np.uint8)
    m[4:10, 5:12] = 255
    Image.fromarray(m).save(path)
    return str(path)


@pytest.fixture
def samples(tmp_path):
    normal = Sample(_write_rgb(tmp_path / "good.png"), 0, "bottle")
    bad = Sample(_write_rgb(tmp_path / "crack.png"), 1, "bottle",
                 mask_path=_write_mask(tmp_path / "crack_mask.png"))
    nogt = Sample(_write_rgb(tmp_path / "ct.png", 16, 16), 1, "brain", has_pixel_gt=False)
    return [normal, bad, nogt]


def test_items_have_documented_shapes_and_types(samples):
    ds = ZSADDataset(samples, image_size=S)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, S, S) and item["mask"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert isinstance(item["has_mask"], bool)
        assert isinstance(item["class_name"], str) and isinstance(item["path"], str)
        assert item["index"] == i
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    normal, anomalous, nogt = ds[0], ds[1], ds[2]
    assert normal["mask"].sum() == 0 and normal["has_mask"] and normal["label"] == 0
    assert anomalous["mask"].sum() > 0 and anomalous["has_mask"] and anomalous["label"] == 1
    assert nogt["mask"].sum() == 0 and not nogt["has_mask"] and nogt["label"] == 1
    assert normal["orig_size"] == (24, 30) and nogt["orig_size"] == (16, 16)
    expected = preprocess_image(Image.open(samples[1].image_path).convert("RGB"), S)
    assert torch.equal(anomalous["image"], expected)


def test_anomalous_without_mask_path_is_an_error(tmp_path):
    s = Sample(_write_rgb(tmp_path / "x.png"), 1, "bottle", mask_path=None, has_pixel_gt=True)
    with pytest.raises(MoECLIPError, match="x.png"):
        ZSADDataset([s], image_size=S)


def test_mask_of_other_size_is_resized_independently(tmp_path, caplog):
    img = _write_rgb(tmp_path / "a.png", 24, 30)
    small = np.zeros((12, 15), np.uint8)
    small[2:5, 3:6] = 1                              # VisA-style label value
    Image.fromarray(small).save(tmp_path / "a_mask.png")
    s = Sample(img, 1, "pcb", mask_path=str(tmp_path / "a_mask.png"))
    ds = ZSADDataset([s, s], image_size=S)
    with caplog.at_level(logging.WARNING, logger="moeclip.data.dataset"):
        m0, _ = ds[0]["mask"], ds[1]["mask"]
    assert torch.equal(m0, preprocess_mask(small != 0, S))
    assert sum("resized" in r.message for r in caplog.records) == 1


def test_half_policy_reaches_the_mask(tmp_path):
    img = _write_rgb(tmp_path / "e.png", 16, 16)
    m = np.full((16, 16), 20, np.uint8)
    m[4:8, 4:8] = 240
    Image.fromarray(m).save(tmp_path / "e_mask.png")
    s = Sample(img, 1, "polyp", mask_path=str(tmp_path / "e_mask.png"))
    assert ZSADDataset([s], image_size=16)[0]["mask"].sum() == 256
    assert ZSADDataset([s], image_size=16, mask_policy="half")[0]["mask"].sum() == 16


def _break(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def test_corrupt_file_raises_with_path(samples):
    _break(samples[0].image_path)
    ds = ZSADDataset(samples, image_size=S)
    with pytest.raises(MoECLIPError, match="good.png"):
        ds[0]
    with pytest.raises(MoECLIPError, match="good.png"):
        ds.validate(progress=False)
    assert len(ds) == 3                              # strict mode drops nothing


def test_skip_bad_validate_lists_and_drops_bad_files(samples, tmp_path):
    _break(samples[0].image_path)
    _break(samples[1].mask_path)
    ds = ZSADDataset(samples, image_size=S, skip_bad=True)
    bad = ds.validate(progress=False)
    assert [p for p, _ in bad] == [samples[0].image_path, samples[1].image_path]
    assert "crack_mask.png" in bad[1][1]
    assert len(ds) == 1 and ds[0]["path"] == samples[2].image_path
    assert ds.skipped == bad


def test_skip_bad_getitem_serves_next_readable(samples):
    _break(samples[0].image_path)
    ds = ZSADDataset(samples, image_size=S, skip_bad=True)
    item = ds[0]
    assert item["index"] == 1 and item["path"] == samples[1].image_path
    assert ds.skipped and ds.skipped[0][0] == samples[0].image_path


def test_dataloader_with_collate(samples):
    ds = ZSADDataset(samples, image_size=S)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, S, S)
    assert batch["mask"].shape == (3, 1, S, S)
    assert batch["label"].tolist() == [0, 1, 1]
    assert batch["has_mask"].tolist() == [True, True, False]
    assert batch["class_name"] == ["bottle", "bottle", "brain"]
    assert batch["path"] == [s.image_path for s in samples]
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["orig_size"] == [(24, 30), (24, 30), (16, 16)]


def test_training_augmentation_is_seeded_by_global_rng(samples):
    ds = ZSADDataset(samples[:2], image_size=S, augment=True)
    torch.manual_seed(111)
    first = [ds[1] for _ in range(6)]
    torch.manual_seed(111)
    second = [ds[1] for _ in range(6)]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert set(a["mask"].unique().tolist()) <= {0.0, 1.0}
    assert any(not torch.equal(first[0]["mask"], f["mask"]) for f in first[1:])
