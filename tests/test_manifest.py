"""Official JSONL and AdaCLIP/AnomalyCLIP meta.json: parsing, round trips, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeclip.data.manifest import (
    ManifestRecord,
    read_jsonl,
    read_jsonl_records,
    read_manifest,
    read_meta,
    read_meta_records,
    records_to_samples,
    resolve_path,
    write_jsonl,
    write_meta,
)
from moeclip.data.sample import Sample
from moeclip.errors import MoECLIPError

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "official-metadata"


def official(key) -> Path:
    path = OFFICIAL / f"{key}.jsonl"
    if not path.is_file():
        pytest.skip(f"official metadata not available at {path}")
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def key_set(samples, root):
    def rel(p):
        return Path(os.path.relpath(p, root)).as_posix() if p else None

    return {(rel(s.image_path), s.label, rel(s.mask_path), s.class_name) for s in samples}


# --------------------------------------------------------------------------- reading the official files


@pytest.mark.parametrize("key,total,anomalous,masks", [
    ("Brain", 3715, 3075, 3075),        # no newline after the last line
    ("Colon_Kvasir", 1000, 1000, 1000),  # idem
    ("BTAD", 741, 290, 290),             # float labels
    ("headct", 200, 100, 0),             # anomalies without mask_path
    ("Endo", 200, 200, 200),             # class_name before label; space in paths
])
def test_read_official_jsonl(key, total, anomalous, masks):
    records = read_jsonl_records(official(key))
    assert len(records) == total
    assert sum(r.label for r in records) == anomalous
    assert sum(1 for r in records if r.mask_path) == masks
    assert all(type(r.label) is int for r in records)


def test_defect_type_from_test_folder():
    records = read_jsonl_records(official("MVTec"))
    assert {r.defect_type for r in records if r.class_name == "bottle"} == {
        "good", "broken_large", "broken_small", "contamination"}


def test_tolerant_parsing(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"image_path": "a/1.png", "label": 0, "class_name": "a"}\r\n'
        b"\n   \n"
        b'{"image_path": "a/2.png", "label": 1.0, "class_name": "a", "mask_path": ""}\n'
        b'{"image_path": "a/3.png", "label": "1", "class_name": "a", "mask_path": null}\n'
        b'{"image_path": "a/4.png", "label": 1, "class_name": "a", "mask_path": "m/4.png"}')
    records = read_jsonl_records(path)
    assert [(r.label, r.mask_path) for r in records] == [(0, None), (1, None), (1, None),
                                                         (1, "m/4.png")]


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"label": 0, "class_name": "a"}', "missing required key 'image_path'"),
    ('{"image_path": "x.png", "class_name": "a"}', "missing required key 'label'"),
    ('{"image_path": "x.png", "label": 2, "class_name": "a"}', "label must be 0 or 1"),
    ('{"image_path": "x.png", "label": "bad", "class_name": "a"}', "label must be 0 or 1"),
    ('{"image_path": "x.png", "label": 0}', "missing required key 'class_name'"),
    ('{"image_path": 3, "label": 0, "class_name": "a"}', "image_path must be a non-empty string"),
    ('{"image_path": "x.png", "label": 1, "class_name": "a", "mask_path": 5}', "mask_path must be"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image_path": "ok.png", "label": 0, "class_name": "a"}\n\n' + line + "\n")
    with pytest.raises(MoECLIPError) as err:
        read_jsonl_records(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(MoECLIPError, match="file not found"):
        read_jsonl_records(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- samples


def test_records_to_samples_pixel_gt_and_variants(tmp_path):
    records = [ManifestRecord("Woven_068/test/good/mesh_000.png", 0, "Woven"),
               ManifestRecord("Woven_068/test/bad/000.png", 1, "Woven", "Woven_068/gt/000_mask.png"),
               ManifestRecord("Woven_001/test/bad/001.png", 1, "Woven")]
    samples = records_to_samples(records, tmp_path, dataset="DTD-Synthetic", variant_from_path=True)
    assert [s.variant for s in samples] == ["Woven_068", "Woven_068", "Woven_001"]
    assert [s.has_pixel_gt for s in samples] == [True, True, False]
    assert samples[0].image_path == str(tmp_path / "Woven_068/test/good/mesh_000.png")
    image_level = records_to_samples([ManifestRecord("t/good/1.png", 0, "h"),
                                      ManifestRecord("t/defect/2.png", 1, "h")], tmp_path)
    assert not any(s.has_pixel_gt for s in image_level)


def test_resolve_path_extension_fallback(tmp_path):
    touch(tmp_path / "01" / "0001.png")
    touch(tmp_path / "v" / "000.JPG")
    assert resolve_path(tmp_path, "01/0001.bmp") == tmp_path / "01" / "0001.png"
    assert resolve_path(tmp_path, "v/000.jpg").name in ("000.JPG", "000.jpg")  # case-insensitive FS
    assert resolve_path(tmp_path, "x/missing.png") == tmp_path / "x" / "missing.png"
    absolute = touch(tmp_path / "elsewhere" / "a b.png")
    assert resolve_path(tmp_path / "root", str(absolute)) == absolute


def test_fallback_reported_once(tmp_path):
    for i in range(3):
        touch(tmp_path / f"{i}.png")
    problems = []
    samples = records_to_samples([ManifestRecord(f"{i}.bmp", 0, "c") for i in range(3)], tmp_path,
                                 problems=problems)
    assert all(s.image_path.endswith(".png") for s in samples)
    assert len(problems) == 1 and "3 listed file(s)" in problems[0]


# --------------------------------------------------------------------------- writing


def test_jsonl_round_trip_official(tmp_path):
    src = official("MVTec")
    samples = read_jsonl(src, tmp_path / "data")
    out = tmp_path / "data" / "MVTec.jsonl"
    out.parent.mkdir()
    assert write_jsonl(samples, out) == len(samples)
    again = read_jsonl(out)
    assert key_set(again, out.parent) == key_set(samples, tmp_path / "data")
    assert {(r.image_path, r.label, r.mask_path, r.class_name) for r in read_jsonl_records(out)} \
        == {(r.image_path, r.label, r.mask_path, r.class_name) for r in read_jsonl_records(src)}
    lines = out.read_text().splitlines()
    normal = json.loads(next(line for line in lines if '"label": 0' in line))
    assert list(normal) == ["image_path", "label", "class_name"]  # no mask_path key for normals
    anomalous = json.loads(next(line for line in lines if '"label": 1' in line))
    assert list(anomalous) == ["image_path", "label", "mask_path", "class_name"]


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    out = tmp_path / "m.jsonl"
    out.write_text("keep me\n")
    samples = [Sample(str(tmp_path / "a.png"), 0, "c")]
    with pytest.raises(MoECLIPError, match="already exists"):
        write_jsonl(samples, out)
    assert out.read_text() == "keep me\n"
    write_jsonl(samples, out, overwrite=True)
    assert json.loads(out.read_text()) == {"image_path": "a.png", "label": 0, "class_name": "c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp file left


def test_paths_outside_root_written_absolute(tmp_path):
    out = tmp_path / "lists" / "m.jsonl"
    out.parent.mkdir()
    write_jsonl([Sample(str(tmp_path / "data" / "a.png"), 0, "c")], out)
    assert json.loads(out.read_text())["image_path"] == (tmp_path / "data" / "a.png").as_posix()


# --------------------------------------------------------------------------- meta.json


def test_meta_round_trip(tmp_path):
    samples = read_jsonl(official("BTAD"), tmp_path)
    meta = tmp_path / "meta.json"
    assert write_meta(samples, meta) == 741
    text = meta.read_text()
    assert text.endswith("}\n") and '"specie_name": "ko"' in text
    again = read_meta(meta)
    assert key_set(again, tmp_path) == key_set(samples, tmp_path)
    assert {s.defect_type for s in again} == {"ok", "ko"}
    assert read_manifest(tmp_path) == again  # a folder holding meta.json works too
    with pytest.raises(MoECLIPError, match="already exists"):
        write_meta(samples, meta)


def test_meta_variants(tmp_path):
    meta = {
        "Train": {"c": [{"img_path": "", "mask_path": "", "cls_name": "c", "specie_name": "",
                         "anomaly": 0}]},
        "Test": {
            "colon": [
                {"img_path": str(tmp_path / "abs" / "1.png"), "mask_path": str(tmp_path / "m" / "1.png"),
                 "cls_name": "colon", "specie_name": "", "anomaly": 1},
            ],
            "head ct": [
                {"img_path": "head ct/test/good/1.png", "mask_path": "", "cls_name": "head ct",
                 "specie_name": "good", "anomaly": 0},
                {"img_path": "head ct/test/defect/2.png", "mask_path": "", "cls_name": "head ct",
                 "specie_name": "defect", "anomaly": 1},
                {"img_path": "", "mask_path": "", "cls_name": "head ct", "specie_name": "",
                 "anomaly": 0},
            ],
        },
    }
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    samples = read_meta(path, phase="test")
    assert [(s.class_name, s.label, s.mask_path) for s in samples] == [
        ("colon", 1, str(tmp_path / "m" / "1.png")),
        ("head ct", 0, None),
        ("head ct", 1, None),
    ]
    assert samples[0].image_path == str(tmp_path / "abs" / "1.png")
    assert samples[1].image_path == str(tmp_path / "head ct/test/good/1.png")
    assert len(read_meta(path, phase="train")) == 0  # dummy record with empty img_path skipped
    with pytest.raises(MoECLIPError, match="no 'valid' section"):
        read_meta(path, phase="valid")


def test_meta_masks_repaired_by_name(tmp_path):
    recs = [{"img_path": f"c/test/d/{n}.png", "mask_path": f"c/ground_truth/d/{m}_mask.png",
             "cls_name": "c", "specie_name": "d", "anomaly": 1}
            for n, m in [("10", "10"), ("2", "2"), ("3", "10")]]
    recs[0]["mask_path"], recs[1]["mask_path"] = recs[1]["mask_path"], recs[0]["mask_path"]
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"test": {"c": recs}}))
    problems = []
    records = read_meta_records(path, problems=problems)
    assert [Path(r.mask_path).name for r in records] == ["10_mask.png", "2_mask.png", "10_mask.png"]
    assert len(problems) == 2 and all("re-paired by name" in p for p in problems)


@pytest.mark.parametrize("content,message", [
    ('{"test": ', "meta.json:1: not valid JSON"),
    ('[]', "expected a JSON object"),
    ('{"test": []}', "must map class names"),
    ('{"test": {"c": {}}}', "must be a list"),
    ('{"test": {"c": [5]}}', r"test/c\[0\]: expected a JSON object"),
    ('{"test": {"c": [{"img_path": "a.png", "anomaly": 3}]}}', r"test/c\[0\]: label must be 0 or 1"),
    ('{"test": {"c": [{"img_path": "a.png"}]}}', "neither 'anomaly' nor 'specie_name'"),
])
def test_meta_malformed(tmp_path, content, message):
    path = tmp_path / "meta.json"
    path.write_text(content)
    with pytest.raises(MoECLIPError, match=message):
        read_meta_records(path)
