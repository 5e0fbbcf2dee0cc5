"""Layout scanners: exact reproduction of the official test lists, pairing rules, problems."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from moeclip.data.layouts import find_root, looks_like_folder, scan_folder
from moeclip.data.manifest import read_jsonl_records
from moeclip.data.registry import get_dataset, list_datasets
from moeclip.data.scanners import load_data, scan
from moeclip.errors import MoECLIPError

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "official-metadata"
BENCHMARKS = [s.key for s in list_datasets(benchmarks_only=True)]


def official_records(key):
    path = OFFICIAL / f"{key}.jsonl"
    if not path.is_file():
        pytest.skip(f"official metadata not available at {path}")
    return read_jsonl_records(path)


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build_official_tree(root: Path, records) -> None:
    """Empty placeholder files at every listed path, plus the clutter real downloads have.

    Plain ``os`` calls with a cache of created folders: ~25k files must take well under a
    second, and ``Path.mkdir(parents=True)`` per file is ten times slower.
    """
    made = set()
    for rec in records:
        for rel in (rec.image_path, rec.mask_path):
            if not rel:
                continue
            path = os.path.join(root, rel)
            folder = os.path.dirname(path)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    touch(root / "license.txt", b"licence text")
    touch(root / ".DS_Store")


def as_relative_set(result):
    root = result.root

    def rel(p):
        return Path(os.path.relpath(p, root)).as_posix() if p else None

    return {(rel(s.image_path), s.label, rel(s.mask_path), s.class_name) for s in result.samples}


@pytest.fixture(scope="module")
def official_trees(tmp_path_factory):
    """One tree per benchmark, each inside a wrapper folder to exercise root detection.

    The trees hold ~26k empty files; on a tmpfs (``/dev/shm``) that is several times faster
    than on disk, and removing them here spares pytest's own clean-up of old temp folders.
    """
    shm = Path("/dev/shm")
    on_shm = shm.is_dir() and os.access(shm, os.W_OK)
    base = Path(tempfile.mkdtemp(prefix="moeclip-official-", dir=shm)) if on_shm \
        else tmp_path_factory.mktemp("official")
    cache = {}

    def get(key, copy=""):
        """``copy`` names an independent tree a test may modify."""
        if (key, copy) not in cache:
            records = official_records(key)
            start = base / (key + copy)
            root = start / "download" / key
            build_official_tree(root, records)
            cache[key, copy] = (start, root, records)
        return cache[key, copy]

    yield get
    if on_shm:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("key", BENCHMARKS)
def test_scanner_reproduces_official_list(official_trees, key):
    start, root, records = official_trees(key)
    result = scan(key, start)
    assert result.root == root
    expected = {(r.image_path, r.label, r.mask_path, r.class_name) for r in records}
    assert as_relative_set(result) == expected
    assert len(result.samples) == len(records)
    assert all(os.path.isabs(s.image_path) for s in result.samples)
    assert {s.dataset for s in result.samples} == {key}
    if key == "VisA":  # no split_csv in a tree built from the jsonl: reported, not fatal
        assert len(result.problems) == 1 and "1cls.csv" in result.problems[0]
    else:
        assert result.problems == []


def test_headct_has_no_pixel_ground_truth(official_trees):
    start, _, _ = official_trees("headct")
    result = scan("headct", start, strict=True)
    assert not any(s.has_pixel_gt for s in result.samples)
    assert sum(s.label for s in result.samples) == 100


def test_dtd_variants_are_folders(official_trees):
    start, _, _ = official_trees("DTD-Synthetic")
    result = scan("dtd", start)
    assert len({s.variant for s in result.samples}) == 12
    assert len({s.class_name for s in result.samples}) == 8
    assert all(s.variant.split("_")[0] == s.class_name for s in result.samples)
    woven068 = [s for s in result.samples if s.variant == "Woven_068" and s.label == 0]
    assert len(woven068) == 51 and all("mesh_" in s.image_path for s in woven068)


def test_samples_follow_official_class_order(official_trees):
    start, _, _ = official_trees("MVTec")
    result = scan("MVTec", start)
    order = list(dict.fromkeys(s.class_name for s in result.samples))
    assert order == list(get_dataset("MVTec").class_names)
    assert order.index("transistor") < order.index("toothbrush")


def test_endo_space_in_path(official_trees):
    start, _, _ = official_trees("Endo")
    result = scan("endo", start, strict=True)
    assert all("test dataset" in s.image_path and s.mask_path.endswith(".jpg")
               for s in result.samples)


def test_visa_uses_split_csv(official_trees):
    start, root, records = official_trees("VisA", copy="-csv")
    rows = []
    for r in records:
        cls = r.class_name
        rows.append([cls, "test", "anomaly" if r.label else "normal", r.image_path, r.mask_path or ""])
    # Training normals exist on disk in the real release but must not be scanned.
    for cls in {r.class_name for r in records}:
        extra = f"{cls}/Data/Images/Normal/9999.JPG"
        touch(root / extra)
        rows.append([cls, "train", "normal", extra, ""])
    touch(root / "split_csv" / "1cls.csv")
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    result = scan("visa", start, strict=True)
    assert as_relative_set(result) == {(r.image_path, r.label, r.mask_path, r.class_name)
                                       for r in records}


def test_btad_converted_to_png_still_pairs(tmp_path):
    """anomalib rewrites BTAD's .bmp as .png: pairing is by stem, not extension."""
    root = tmp_path / "BTAD"
    for cls in ("01", "02", "03"):
        touch(root / cls / "test" / "ok" / "0000.png")
        touch(root / cls / "test" / "ko" / "0001.png")
        touch(root / cls / "ground_truth" / "ko" / "0001.png")
    result = scan("BTAD", root, strict=True)
    assert len(result.samples) == 6
    assert all(s.mask_path.endswith("ground_truth/ko/0001.png") for s in result.samples if s.label)


def test_bmad_anomaly_mask_folder(tmp_path):
    root = tmp_path / "Brain_AD"
    touch(root / "test" / "good" / "img" / "1_1.png")
    touch(root / "test" / "Ungood" / "img" / "2_1.png")
    touch(root / "test" / "Ungood" / "anomaly_mask" / "2_1.png")
    touch(root / "valid" / "good" / "img" / "9_9.png")  # unused split
    result = scan("brainmri", tmp_path, strict=True)
    assert sorted((s.label, bool(s.mask_path)) for s in result.samples) == [(0, False), (1, True)]


# --------------------------------------------------------------------------- generic folder scanner


def make_generic_tree(root: Path) -> None:
    touch(root / "license.txt")
    touch(root / "metal part" / "test" / "good" / "000.png")
    touch(root / "metal part" / "test" / "good" / ".hidden.png")
    touch(root / "metal part" / "test" / "scratch" / "000.JPG")
    touch(root / "metal part" / "test" / "scratch" / "001.JPG")
    touch(root / "metal part" / "ground_truth" / "scratch" / "000_mask.png")
    touch(root / "metal part" / "ground_truth" / "scratch" / "001.png")  # same-stem style
    touch(root / "metal part" / "train" / "good" / "777.png")  # never scanned
    touch(root / "bolt" / "test" / "good" / "a.bmp")
    touch(root / "bolt" / "test" / "crack" / "b.png")
    touch(root / "bolt" / "ground_truth" / "crack" / "b_mask.png")
    touch(root / "bolt" / "test" / "notes.txt")


def test_generic_folder_scanner(tmp_path):
    make_generic_tree(tmp_path)
    result = scan_folder(tmp_path)
    assert result.problems == []
    got = {(Path(s.image_path).relative_to(tmp_path).as_posix(), s.label, s.class_name,
            Path(s.mask_path).name if s.mask_path else None, s.defect_type)
           for s in result.samples}
    assert got == {
        ("metal part/test/good/000.png", 0, "metal part", None, "good"),
        ("metal part/test/scratch/000.JPG", 1, "metal part", "000_mask.png", "scratch"),
        ("metal part/test/scratch/001.JPG", 1, "metal part", "001.png", "scratch"),
        ("bolt/test/good/a.bmp", 0, "bolt", None, "good"),
        ("bolt/test/crack/b.png", 1, "bolt", "b_mask.png", "crack"),
    }
    assert all(s.has_pixel_gt for s in result.samples)


def test_generic_folder_via_data_arg_and_single_class_root(tmp_path):
    make_generic_tree(tmp_path / "wrap")
    result = load_data(f"folder={tmp_path}")
    assert result.root == tmp_path / "wrap"
    assert len(result.samples) == 5
    single = load_data(f"folder={tmp_path / 'wrap' / 'bolt'}")
    assert {s.class_name for s in single.samples} == {"bolt"}


def test_masks_paired_by_name_not_index(tmp_path):
    cls = tmp_path / "widget"
    for stem in ("000", "001", "002"):
        touch(cls / "test" / "dent" / f"{stem}.png")
    touch(cls / "ground_truth" / "dent" / "000_mask.png")
    touch(cls / "ground_truth" / "dent" / "002_mask.png")
    touch(cls / "ground_truth" / "dent" / "005_mask.png")  # mask without image
    result = scan_folder(tmp_path)
    masks = {Path(s.image_path).stem: s.mask_path and Path(s.mask_path).name for s in result.samples}
    assert masks == {"000": "000_mask.png", "001": None, "002": "002_mask.png"}
    missing = [s for s in result.samples if Path(s.image_path).stem == "001"][0]
    assert missing.has_pixel_gt is False  # left out of pixel metrics, not counted as clean
    assert any("001.png" in p and "no mask" in p for p in result.problems)
    assert any("005_mask.png" in p and "without a matching image" in p for p in result.problems)
    with pytest.raises(MoECLIPError, match="001.png"):
        load_data(f"folder={tmp_path}", strict=True)


def test_image_level_folder_without_ground_truth(tmp_path):
    touch(tmp_path / "part" / "test" / "good" / "1.png")
    touch(tmp_path / "part" / "test" / "bad" / "2.png")
    result = scan_folder(tmp_path)
    assert result.problems == []
    assert [s.has_pixel_gt for s in result.samples] == [False, False]


def test_empty_class_and_missing_class_reported(tmp_path):
    root = tmp_path / "mvtec"
    touch(root / "bottle" / "test" / "good" / "000.png")
    (root / "cable" / "test" / "good").mkdir(parents=True)
    touch(root / "my_new_part" / "test" / "good" / "000.png")
    result = scan("mvtec", root)
    text = "\n".join(result.problems)
    assert "'cable' has no test images" in text
    assert f"{root / 'capsule'}: expected class folder is missing" in text
    assert "my_new_part: not a known class folder" in text
    assert {s.class_name for s in result.samples} == {"bottle"}
    with pytest.raises(MoECLIPError, match="problem"):
        scan("mvtec", root, strict=True)


def test_missing_mask_folder_is_one_problem(tmp_path):
    root = tmp_path / "RSDD"
    for i in range(3):
        touch(root / "Metal15" / "test" / "anomaly" / f"a{i}.bmp")
    touch(root / "Metal15" / "test" / "good" / "n.bmp")
    result = scan("rsdd", root)
    assert len(result.problems) == 1 and "3 anomalous image(s)" in result.problems[0]


def test_polyp_problems(tmp_path):
    root = tmp_path / "CVC-300"
    touch(root / "images" / "1.png")
    touch(root / "images" / "2.png")
    touch(root / "masks" / "1.png")
    touch(root / "masks" / "3.png")
    result = scan("cvc-300", root)
    assert any(p.startswith(str(root / "images" / "2.png")) for p in result.problems)
    assert any(p.startswith(str(root / "masks" / "3.png")) for p in result.problems)
    assert {s.class_name for s in result.samples} == {"CVC-300"}


def test_dagm_raw_layout(tmp_path):
    test = tmp_path / "DAGM" / "Class1" / "Test"
    touch(test / "0001.PNG")
    touch(test / "0002.PNG")
    touch(test / "Label" / "0002_label.PNG")
    result = scan("dagm", tmp_path)
    assert [(Path(s.image_path).name, s.label) for s in result.samples] == [("0001.PNG", 0),
                                                                           ("0002.PNG", 1)]
    assert any("Class2" in p for p in result.problems)


# --------------------------------------------------------------------------- root detection


def test_find_root_depth_limit_and_errors(tmp_path):
    deep = tmp_path / "a" / "b" / "c" / "d"
    touch(deep / "x" / "test" / "good" / "1.png")
    assert find_root(tmp_path / "a", looks_like_folder) == deep
    with pytest.raises(MoECLIPError, match="no .* layout found"):
        find_root(tmp_path, looks_like_folder)
    with pytest.raises(MoECLIPError, match="does not exist"):
        find_root(tmp_path / "nope", looks_like_folder)
    with pytest.raises(MoECLIPError, match="is a file"):
        find_root(touch(tmp_path / "f.txt"), looks_like_folder)


def test_find_root_ambiguity_and_preference(tmp_path):
    for name in ("CVC-ClinicDB", "CVC-ColonDB"):
        touch(tmp_path / name / "images" / "1.png")
        touch(tmp_path / name / "masks" / "1.png")
    assert scan("clinicdb", tmp_path).root == tmp_path / "CVC-ClinicDB"
    assert scan("colondb", tmp_path).root == tmp_path / "CVC-ColonDB"
    with pytest.raises(MoECLIPError, match="several folders"):
        scan("kvasir", tmp_path)


# --------------------------------------------------------------------------- manifests as sources


def test_load_jsonl_finds_root_below_manifest_and_explicit_root(tmp_path):
    records = official_records("headct")
    data = tmp_path / "data" / "unzipped" / "headct"
    build_official_tree(data, records)
    manifest = tmp_path / "data" / "headct.jsonl"
    manifest.write_bytes((OFFICIAL / "headct.jsonl").read_bytes())
    result = load_data(f"jsonl:headct={manifest}")
    assert result.root == data and result.problems == []
    assert {s.dataset for s in result.samples} == {"headct"}
    elsewhere = tmp_path / "lists" / "h.jsonl"
    touch(elsewhere, manifest.read_bytes())
    explicit = load_data(f"jsonl={elsewhere}@{data}")
    assert explicit.root == data and explicit.problems == []
    broken = load_data(f"jsonl={elsewhere}")
    assert broken.problems and "image file missing" in broken.problems[0]


def test_sdd_class_at_root_and_mpdd(tmp_path):
    sdd = tmp_path / "SDD"
    touch(sdd / "train" / "good" / "kos01_Part0_0.png")
    touch(sdd / "test" / "good" / "kos02_Part1_2.png")
    touch(sdd / "test" / "defect" / "kos03_Part5_1.png")
    touch(sdd / "ground_truth" / "defect" / "kos03_Part5_1_mask.png")
    result = scan("ksdd", tmp_path, strict=True)
    assert result.root == sdd
    assert sorted((s.class_name, s.label, bool(s.mask_path)) for s in result.samples) == [
        ("SDD", 0, False), ("SDD", 1, True)]
    mpdd = tmp_path / "MPDD"
    touch(mpdd / "tubes" / "test" / "good" / "000.png")
    touch(mpdd / "tubes" / "test" / "anomalous" / "000.png")
    touch(mpdd / "tubes" / "ground_truth" / "anomalous" / "000_mask.png")
    result = scan("mpdd", mpdd)
    assert [s.class_name for s in result.samples] == ["tubes", "tubes"]
    assert len(result.problems) == 5  # the five other MPDD classes are missing
