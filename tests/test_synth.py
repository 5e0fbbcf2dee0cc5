"""Synthetic anomaly generator: layout, exact masks, determinism, every family/defect, CLI glue."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moeclip.data import synth
from moeclip.errors import MoECLIPError

SIZE = 64


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = synth.generate_dataset(out, categories=["stripes", "disc"], n_normal=2, n_anomalous=6,
                                     image_size=SIZE, seed=3, n_train=1)
    return out, summary


def test_layout_matches_mvtec(small_dataset):
    out, summary = small_dataset
    assert sorted(p.name for p in out.iterdir()) == ["descriptions.json", "disc", "stripes", "synth.json"]
    descriptions = json.loads((out / "descriptions.json").read_text())
    assert set(descriptions) == {"stripes", "disc"} and all(descriptions.values())
    params = json.loads((out / "synth.json").read_text())
    assert params["seed"] == 3 and params["image_size"] == SIZE and params["categories"] == ["stripes", "disc"]

    for cat in ("stripes", "disc"):
        cdir = out / cat
        assert len(list((cdir / "train" / "good").glob("*.png"))) == 1
        goods = sorted((cdir / "test" / "good").glob("*.png"))
        assert [p.name for p in goods] == ["000.png", "001.png"]
        assert not (cdir / "ground_truth" / "good").exists()  # no masks for normal images
        defect_dirs = [d for d in (cdir / "test").iterdir() if d.name != "good"]
        # 6 anomalous images cycle through the defect types: each applicable type appears
        assert {d.name for d in defect_dirs} == set(synth.defects_for(cat))
        n_bad = 0
        for d in defect_dirs:
            for img_path in sorted(d.glob("*.png")):
                n_bad += 1
                img = Image.open(img_path)
                assert img.mode == "RGB" and img.size == (SIZE, SIZE)
                mask = Image.open(cdir / "ground_truth" / d.name / f"{img_path.stem}_mask.png")
                assert mask.mode == "L" and mask.size == (SIZE, SIZE)
                m = np.asarray(mask)
                assert set(np.unique(m)) <= {0, 255} and (m == 255).any()
        assert n_bad == 6
        assert sum(summary["counts"][cat].values()) == 9
        assert summary["counts"][cat]["good"] == 2 and summary["counts"][cat]["train_good"] == 1
    assert summary["total_images"] == 18


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_dataset):
    out, _ = small_dataset
    again = tmp_path / "again"
    synth.generate_dataset(again, categories=["stripes", "disc"], n_normal=2, n_anomalous=6,
                           image_size=SIZE, seed=3, n_train=1)
    assert _files(again) == _files(out)

    other = tmp_path / "other"
    synth.generate_dataset(other, categories=["stripes", "disc"], n_normal=2, n_anomalous=6,
                           image_size=SIZE, seed=4, n_train=1)
    a, b = _files(out), _files(other)
    assert a.keys() != b.keys() or a["stripes/test/good/000.png"] != b["stripes/test/good/000.png"]
    assert a["disc/test/good/000.png"] != b["disc/test/good/000.png"]


def test_worker_processes_write_the_same_files(tmp_path, small_dataset):
    out, _ = small_dataset
    parallel = tmp_path / "parallel"
    synth.generate_dataset(parallel, categories=["stripes", "disc"], n_normal=2, n_anomalous=6,
                           image_size=SIZE, seed=3, n_train=1, workers=2)
    assert _files(parallel) == _files(out)
    with pytest.raises(MoECLIPError, match="workers"):
        synth.generate_dataset(tmp_path / "w0", categories="disc", workers=0)


def test_a_category_does_not_depend_on_the_others(tmp_path, small_dataset):
    out, _ = small_dataset
    alone = tmp_path / "alone"
    synth.generate_dataset(alone, categories="disc", n_normal=2, n_anomalous=6, image_size=SIZE,
                           seed=3, n_train=1)
    full = {k: v for k, v in _files(out).items() if k.startswith("disc/")}
    assert {k: v for k, v in _files(alone).items() if k.startswith("disc/")} == full


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MoECLIPError, match="busy"):
        synth.generate_dataset(out, categories="dots", n_normal=1, n_anomalous=1, image_size=32)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    synth.generate_dataset(out, categories="dots,ring", n_normal=1, n_anomalous=1, image_size=32,
                           overwrite=True)
    # overwrite replaces what a previous run generated (no stale categories) and keeps the rest
    synth.generate_dataset(out, categories="dots", n_normal=1, n_anomalous=1, image_size=32,
                           overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["descriptions.json", "dots", "keep.txt", "synth.json"]
    assert (out / "keep.txt").read_text() == "user data"


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(MoECLIPError, match="unknown synthetic category"):
        synth.generate_dataset(tmp_path / "x", categories="stripes,banana")
    with pytest.raises(MoECLIPError, match="image size"):
        synth.generate_dataset(tmp_path / "x", categories="stripes", image_size=8)
    with pytest.raises(MoECLIPError, match="does not apply"):
        synth.draw_sample("stripes", 0, SIZE, "missing")
    with pytest.raises(MoECLIPError):
        synth.draw_sample("banana", 0, SIZE)


def test_default_split_is_disjoint_and_covers_all():
    train, held = set(synth.DEFAULT_TRAIN_CATEGORIES), set(synth.DEFAULT_HELDOUT_CATEGORIES)
    assert not train & held and train | held == set(synth.list_families())
    # held-out contains unseen textures *and* unseen objects
    assert held & set(synth.TEXTURE_FAMILIES) and held & set(synth.OBJECT_FAMILIES)
    assert synth.resolve_categories("heldout") == list(synth.DEFAULT_HELDOUT_CATEGORIES)
    assert synth.resolve_categories("train") == list(synth.DEFAULT_TRAIN_CATEGORIES)
    assert synth.resolve_categories(None) == synth.resolve_categories("all") == synth.list_families()
    assert synth.resolve_categories("disc, stripes,disc") == ["disc", "stripes"]
    for fam in synth.list_families():
        info = synth.family_info(fam)
        assert info["split"] == ("heldout" if fam in held else "train") and info["description"]


@pytest.mark.parametrize("family", synth.list_families())
def test_every_family_and_defect_draws(family):
    img, mask, kind = synth.draw_sample(family, 0, SIZE)
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE) and not mask.any() and kind == "good"
    assert img.std() > 3  # not a blank image

    for defect in synth.defects_for(family):
        for seed in range(2):
            clean, bad, m, kind = synth.draw_pair(family, seed, SIZE, defect)
            assert kind == defect and m.any()
            # the defect changes the image inside its mask and (almost) nowhere else
            diff = np.abs(bad.astype(np.float32) - clean.astype(np.float32)).mean(-1)
            inside, outside = diff[m].mean(), diff[~m].mean()
            assert inside > 15 and inside > 20 * outside, (family, defect, seed, inside, outside)


def test_draws_are_deterministic_and_pairs_match_samples():
    a = synth.draw_sample("gear", 11, SIZE, "hole")
    b = synth.draw_sample("gear", np.random.default_rng(11), SIZE, "hole")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    clean, bad, mask, kind = synth.draw_pair("gear", 11, SIZE, "hole")
    assert np.array_equal(bad, a[0]) and np.array_equal(mask, a[1]) and kind == "hole"
    c = synth.draw_sample("gear", 12, SIZE, "hole")
    assert not np.array_equal(a[0], c[0])
    # "random" picks an applicable type
    kinds = {synth.draw_sample("stripes", s, 32, "random")[2] for s in range(30)}
    assert kinds <= set(synth.defects_for("stripes")) and len(kinds) >= 3


def test_draw_batch():
    images, masks, labels, kinds = synth.draw_batch(["disc", "cells"], 5, 8, size=32, anomaly_rate=0.5)
    assert images.shape == (8, 32, 32, 3) and masks.shape == (8, 32, 32) and labels.shape == (8,)
    for m, label, kind in zip(masks, labels, kinds):
        assert bool(m.any()) == bool(label) == (kind != "good")


def test_cli_glue(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_synth_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--out", str(out), "--categories", "heldout", "--normal", "1",
                              "--anomalous", "2", "--size", "32", "--seed", "7"])
    assert synth.run_synth(args) == 0
    printed = capsys.readouterr().out
    for cat in synth.DEFAULT_HELDOUT_CATEGORIES:
        assert cat in printed
    assert str(out) in printed and "heldout" in printed
    assert json.loads((out / "synth.json").read_text())["seed"] == 7
    with pytest.raises(MoECLIPError, match="not empty"):
        synth.run_synth(args)
    args = parser.parse_args(["--out", str(out), "--categories", "wood", "--normal", "1",
                              "--anomalous", "0", "--size", "32", "--overwrite"])
    assert synth.run_synth(args) == 0
    assert (out / "wood" / "test" / "good" / "000.png").is_file() and not (out / "nut").exists()


def test_tiny_images_still_get_defects():
    """At 32 px thin objects (rings) leave little room; every defect must still land."""
    for family in synth.list_families():
        for defect in synth.defects_for(family):
            _, mask, _ = synth.draw_sample(family, 1, 32, defect)
            assert mask.any(), (family, defect)
