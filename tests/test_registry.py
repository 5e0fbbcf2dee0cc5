"""Benchmark registry: names, aliases, class tables, descriptions, --data parsing."""
from __future__ import annotations

from pathlib import Path

import pytest

from moeclip.data.manifest import read_jsonl_records
from moeclip.data.registry import (
    DataFormat,
    DatasetSpec,
    describe,
    get_dataset,
    list_datasets,
    load_descriptions,
    parse_data_arg,
)
from moeclip.errors import MoECLIPError

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "official-metadata"

KEYS = ["MVTec", "VisA", "BTAD", "RSDD", "DTD-Synthetic", "Brain", "headct", "Liver", "Retina",
        "Colon_colonDB", "Colon_clinicDB", "Colon_cvc300", "Endo", "Colon_Kvasir"]


def test_fourteen_benchmarks_in_paper_order():
    specs = list_datasets(benchmarks_only=True)
    assert [s.key for s in specs] == KEYS
    assert [s.domain for s in specs].count("industrial") == 5
    assert [s.domain for s in specs].count("medical") == 9
    assert [s.display_name for s in specs] == [
        "MVTec AD", "VisA", "BTAD", "RSDD", "DTD-Synthetic", "BrainMRI", "HeadCT", "LiverCT",
        "RetinaOCT", "ColonDB", "ClinicDB", "CVC-300", "Endo", "Kvasir"]
    extras = [s.key for s in list_datasets() if not s.benchmark]
    assert extras == ["MPDD", "SDD", "DAGM"]


@pytest.mark.parametrize("alias,key", [
    ("mvtec", "MVTec"), ("MVTEC_AD", "MVTec"), ("MVTec AD", "MVTec"), ("visa", "VisA"),
    ("btad", "BTAD"), ("rsdd", "RSDD"), ("dtd", "DTD-Synthetic"), ("DTD-Synthetic", "DTD-Synthetic"),
    ("brainmri", "Brain"), ("brain", "Brain"), ("headct", "headct"), ("HeadCT", "headct"),
    ("livect", "Liver"), ("retinaoct", "Retina"), ("colondb", "Colon_colonDB"),
    ("clinicdb", "Colon_clinicDB"), ("cvc300", "Colon_cvc300"), ("cvc-300", "Colon_cvc300"),
    ("CVC-300", "Colon_cvc300"), ("endo", "Endo"), ("kvasir", "Colon_Kvasir"),
    ("Colon_Kvasir", "Colon_Kvasir"), ("mpdd", "MPDD"), ("ksdd", "SDD"), ("dagm", "DAGM"),
])
def test_aliases(alias, key):
    assert get_dataset(alias).key == key


def test_unknown_dataset_lists_known_names():
    with pytest.raises(MoECLIPError) as err:
        get_dataset("imagenet")
    assert "'imagenet'" in str(err.value)
    for key in KEYS:
        assert key in str(err.value)


def test_class_tables():
    assert get_dataset("MVTec").class_names[11:13] == ("transistor", "toothbrush")
    assert len(get_dataset("VisA").class_names) == 12
    assert get_dataset("VisA").class_names[:3] == ("candle", "pcb3", "capsules")
    dtd = get_dataset("DTD-Synthetic")
    assert dtd.class_names == ("Blotchy", "Fibrous", "Marbled", "Matted", "Mesh", "Perforated",
                               "Stratified", "Woven")
    assert dtd.variant_from_folder
    assert get_dataset("cvc300").class_names == ("CVC-300",)
    assert get_dataset("kvasir").class_names == ("Kvasir",)
    assert not get_dataset("headct").has_masks
    assert all(s.has_masks for s in list_datasets() if s.key != "headct")


@pytest.mark.parametrize("key", KEYS)
def test_official_classes_are_registered(key):
    path = OFFICIAL / f"{key}.jsonl"
    if not path.is_file():
        pytest.skip(f"official metadata not available at {path}")
    spec = get_dataset(key)
    classes = {r.class_name for r in read_jsonl_records(path)}
    assert classes == set(spec.class_names)
    assert classes <= set(spec.descriptions)


def test_descriptions():
    mvtec = get_dataset("MVTec")
    assert mvtec.describe("capsule") == "black asd orange capsule"
    assert mvtec.describe("capsule", fix_typos=True) == "black and orange capsule"
    assert describe(mvtec, "bottle", fix_typos=True) == "dark bottle"
    assert describe(get_dataset("headct"), "headct") == "scan"
    assert describe(get_dataset("brain"), "Brain") == "scan"
    assert describe(get_dataset("endo"), "Endo") == "polyp"
    assert describe(get_dataset("kvasir"), "Kvasir") == "colon endoscopy image"
    assert describe(get_dataset("rsdd"), "RSDD") == "metal"
    assert describe(get_dataset("dtd"), "Woven") == "Woven"
    assert describe(get_dataset("btad"), "02") == "vertical fabric lines in warm, dusty pink and beige tones"
    assert describe(None, "metal_plate_v2") == "metal plate v2"
    assert describe(mvtec, "new_part") == "new part"
    assert describe(mvtec, "bottle", overrides={"bottle": "green bottle"}) == "green bottle"


def test_load_descriptions(tmp_path):
    as_json = tmp_path / "d.json"
    as_json.write_text('{"bolt": " steel hex bolt ", "metal_plate": "plate"}')
    assert load_descriptions(as_json) == {"bolt": "steel hex bolt", "metal_plate": "plate"}
    as_text = tmp_path / "d.txt"
    as_text.write_text("# my parts\nbolt: steel hex bolt\n\nlabel: sticker: with colon\n")
    assert load_descriptions(as_text) == {"bolt": "steel hex bolt", "label": "sticker: with colon"}
    bad = tmp_path / "bad.txt"
    bad.write_text("bolt: ok\nno separator here\n")
    with pytest.raises(MoECLIPError, match=r"bad.txt:2: expected 'class: description'"):
        load_descriptions(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"bolt": 3}')
    with pytest.raises(MoECLIPError, match="bolt"):
        load_descriptions(bad_json)
    with pytest.raises(MoECLIPError, match="cannot read"):
        load_descriptions(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- --data parsing


def test_parse_known_dataset():
    spec, path = parse_data_arg("mvtec_ad=/data/MVTec AD")
    assert isinstance(spec, DatasetSpec) and spec.key == "MVTec"
    assert path == Path("/data/MVTec AD")
    _, with_equals = parse_data_arg("visa=/data/a=b")
    assert with_equals == Path("/data/a=b")


def test_parse_generic_formats(tmp_path):
    fmt, path = parse_data_arg("folder=/data/mine")
    assert fmt == DataFormat("folder") and fmt.key == "custom" and path == Path("/data/mine")
    fmt, path = parse_data_arg("JSONL:MVTec=/lists/MVTec.jsonl@/data/mvtec")
    assert fmt.name == "jsonl" and fmt.dataset.key == "MVTec" and fmt.key == "MVTec"
    assert fmt.root == Path("/data/mvtec") and path == Path("/lists/MVTec.jsonl")
    at_name = tmp_path / "me@work.jsonl"
    at_name.touch()
    fmt, path = parse_data_arg(f"jsonl={at_name}")
    assert fmt.root is None and path == at_name
    fmt, path = parse_data_arg("meta:visa=/data/visa/meta.json")
    assert fmt.name == "meta" and fmt.dataset.key == "VisA" and fmt.root is None


@pytest.mark.parametrize("value,message", [
    ("/data/mvtec", "expected NAME=PATH"),
    ("mvtec=", "both NAME and PATH"),
    ("=/data", "both NAME and PATH"),
    ("mvtec:visa=/data", "only allowed with the generic formats"),
    ("imagenet=/data", "unknown dataset"),
    ("jsonl:nope=/a.jsonl", "unknown dataset 'nope'"),
    ("jsonl=/a.jsonl@", "expected jsonl=FILE@ROOT"),
])
def test_parse_errors(value, message):
    with pytest.raises(MoECLIPError, match=message):
        parse_data_arg(value)


def test_layers_without_cycle():
    """layouts (no dataset names) <- registry (binds them) <- scanners (what --data names)."""
    import subprocess
    import sys

    code = ("import sys; import moeclip.data.registry; "
            "assert 'moeclip.data.layouts' in sys.modules and 'moeclip.data.scanners' not in sys.modules; "
            "import moeclip.data.layouts as lay; "
            "assert not any(m in sys.modules for m in ('moeclip.data.scanners', 'torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)
