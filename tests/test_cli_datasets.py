"""``moeclip datasets list|scan`` run in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeclip.cli import main

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "official-metadata"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@pytest.fixture
def part_tree(tmp_path):
    """Generic folder tree: one class with a missing mask (a problem), one clean class."""
    root = tmp_path / "parts"
    touch(root / "bolt" / "test" / "good" / "0.png")
    touch(root / "bolt" / "test" / "good" / "1.png")
    touch(root / "bolt" / "test" / "crack" / "2.png")
    touch(root / "bolt" / "test" / "crack" / "3.png")
    touch(root / "bolt" / "ground_truth" / "crack" / "2_mask.png")
    touch(root / "nut" / "test" / "good" / "0.png")
    touch(root / "nut" / "test" / "dent" / "1.png")
    touch(root / "nut" / "ground_truth" / "dent" / "1.png")
    touch(root / "readme.txt")
    return root


def table_rows(out: str):
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and all(x.isdigit() for x in parts[1:]):
            rows[parts[0]] = [int(x) for x in parts[1:]]
    return rows


def test_list(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for word in ("MVTec", "MVTec AD", "industrial", "Colon_cvc300", "medical", "MPDD"):
        assert word in out
    assert main(["datasets", "list", "--benchmarks-only"]) == 0
    out = capsys.readouterr().out
    assert "MPDD" not in out and "Colon_Kvasir" in out


def test_scan_prints_counts_and_problems(part_tree, capsys):
    assert main(["datasets", "scan", "--data", f"folder={part_tree}"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["bolt"] == [2, 2, 1, 1]
    assert rows["nut"] == [1, 1, 1, 0]
    assert rows["total"] == [3, 3, 2, 1]
    assert "1 problem(s)" in out and "3.png" in out and "no mask" in out


def test_scan_strict_fails_with_problems(part_tree, capsys):
    assert main(["datasets", "scan", "--data", f"folder={part_tree}", "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "3.png" in err


def test_scan_out_refuses_overwrite(part_tree, tmp_path, capsys):
    out_file = tmp_path / "parts.jsonl"
    assert main(["datasets", "scan", "--data", f"folder={part_tree}", "--out", str(out_file)]) == 0
    first = out_file.read_text()
    records = [json.loads(line) for line in first.splitlines()]
    assert len(records) == 6
    assert {r["image_path"] for r in records} >= {"bolt/test/crack/2.png", "nut/test/dent/1.png"}
    assert {r.get("mask_path") for r in records if r["label"]} == {"bolt/ground_truth/crack/2_mask.png",
                                                                  "nut/ground_truth/dent/1.png", None}
    capsys.readouterr()

    out_file.write_text("user data\n")
    assert main(["datasets", "scan", "--data", f"folder={part_tree}", "--out", str(out_file)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out_file.read_text() == "user data\n"

    assert main(["datasets", "scan", "--data", f"folder={part_tree}", "--out", str(out_file),
                 "--overwrite"]) == 0
    assert out_file.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts", "parts.jsonl"]


def test_scan_known_dataset_and_round_trip(tmp_path, capsys):
    src = OFFICIAL / "headct.jsonl"
    if not src.is_file():
        pytest.skip("official metadata not available")
    root = tmp_path / "HeadCT" / "headct"
    for line in src.read_text().splitlines():
        touch(root / json.loads(line)["image_path"])
    out_file = tmp_path / "headct.jsonl"
    assert main(["datasets", "scan", "--data", f"HeadCT={tmp_path}", "--strict",
                 "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert table_rows(out)["headct"] == [100, 100, 0, 100]
    assert "no problems found" in out
    assert main(["datasets", "scan", "--data", f"jsonl:headct={out_file}@{root}", "--strict"]) == 0
    assert table_rows(capsys.readouterr().out)["total"] == [100, 100, 0, 100]


@pytest.mark.parametrize("data,message", [
    ("nothing", "expected NAME=PATH"),
    ("imagenet=/tmp", "unknown dataset"),
])
def test_scan_bad_data_argument(data, message, capsys):
    assert main(["datasets", "scan", "--data", data]) == 2
    assert message in capsys.readouterr().err


def test_scan_missing_folder(tmp_path, capsys):
    assert main(["datasets", "scan", "--data", f"mvtec={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_synth_output_scans_cleanly(tmp_path, capsys):
    """``datasets synth`` (moeclip.data.synth, part of the package: no skip) writes a tree the folder scanner reads."""
    out = tmp_path / "synth"
    assert main(["datasets", "synth", "--out", str(out), "--categories", "stripes,pill",
                 "--normal", "2", "--anomalous", "3", "--size", "32"]) == 0
    capsys.readouterr()
    assert main(["datasets", "scan", "--data", f"folder={out}", "--strict"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["total"] == [4, 6, 6, 0]


def test_cli_parser_builds_without_importing_torch():
    """`moeclip --help` and argument errors answer at once: no torch/torchvision import (~3 s) to build the parser."""
    import subprocess
    import sys

    code = ("import sys; from moeclip.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
