"""``moeclip predict --ray`` and ``moeclip.integrations.ray`` on a local Ray cluster (2 CPUs, one per module)."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_f32_close, make_tiny_checkpoint, require_extra
from PIL import Image

from moeclip.cli import main

ray = require_extra("ray")
require_extra("ray.data")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster whose session folder (logs, sockets, spilled objects) lives in the test's temporary
    folder, not in /tmp/ray. Ray's Unix socket paths ({temp}/session_<date>_<pid>/sockets/plasma_store, ~62
    characters below the folder) must fit in 107 bytes: a long pytest base folder falls back to a short one."""
    temp, own = tmp_path_factory.mktemp("ray"), None
    if len(str(temp)) > 40:
        temp = own = Path(tempfile.mkdtemp(prefix="moeclip-ray-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=False,
             _temp_dir=str(temp))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="module")
def ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """11 images in two folders (two objects, a stem in both) and one unreadable file."""
    root = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        _image(root / "screw" / f"s{i}.png", 40 + 4 * i, 56, i)
    for i in range(5):
        _image(root / "nut" / f"n{i}.png", 64, 48 + 6 * i, 10 + i)
    _image(root / "nut" / "s0.png", 30, 30, 99)  # the same stem as screw/s0.png
    (root / "nut" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def lines(out: Path) -> list:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def args(ckpt, images, out, *extra):
    return ["predict", "--checkpoint", str(ckpt), "--device", "cpu", "--object", "screw=metal screw",
            "--batch-size", "3", str(images), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(ckpt, images, tmp_path_factory):
    """Single-process predict: the output every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(args(ckpt, images, out)) == 0
    return out


def assert_same_results(ray_out: Path, ref_out: Path) -> None:
    """Every line of single-process predict, once, with the same values (float32 of another batch grouping:
    see F32_RTOL) and the same files."""
    got, want = lines(ray_out), lines(ref_out)
    assert len(got) == len({r["path"] for r in got})  # each image exactly once
    by_path = {r["path"]: r for r in got}
    assert by_path.keys() == {r["path"] for r in want}
    for ref in want:
        r = by_path[ref["path"]]
        assert r.keys() == ref.keys(), ref["path"]
        for k, v in ref.items():
            if isinstance(v, float):
                # after an actor died, Ray re-ran its images in another batch composition: batched matmuls
                # round differently (map_max 21.58476448 vs 21.58476639 on an AMD EPYC, 1 ulp): relative to
                # the value's magnitude, or to the [0, 1] range of scores
                assert_f32_close(r[k], v, scale=max(abs(v), 1.0), what=f"{ref['path']}: {k}")
            else:
                assert r[k] == v, (ref["path"], k)
        if "map" in ref:
            # raw maps (sums of 12 maps, ~20): float32 rounding of another batch grouping, relative to the map's
            # magnitude
            assert_f32_close(np.load(ray_out / r["map"]), np.load(ref_out / ref["map"]), what=ref["path"])
            a = np.asarray(Image.open(ray_out / r["overlay"]), dtype=int)
            b = np.asarray(Image.open(ref_out / ref["overlay"]), dtype=int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1  # colours of equal maps: a rounding step


@pytest.fixture(scope="module")
def ray_run(cluster, ckpt, images, tmp_path_factory):
    """``predict --ray local`` with 2 actors, one of which dies (SIGKILL, a test hook) on its second batch."""
    from moeclip.integrations.ray import CRASH_ENV

    work = tmp_path_factory.mktemp("ray")
    marker, out = work / "crashed", work / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CRASH_ENV, f"1:{marker}")
        assert main(args(ckpt, images, out, "--ray", "local", "--ray-actors", "2")) == 0
    assert marker.exists()  # the crash happened; Ray restarted the actor and re-ran its batch
    return out


def test_ray_predict_equals_single_process_though_an_actor_died(ray_run, reference):
    assert_same_results(ray_run, reference)
    rows = lines(ray_run)
    assert [r["path"] for r in rows] == [r["path"] for r in lines(reference)]  # even in the same order
    assert sum("error" in r for r in rows) == 1 and "broken.png" in next(r["error"] for r in rows if "error" in r)
    assert {r["object"] for r in rows} == {"metal screw", "object"}
    import pyarrow.parquet as pq

    table = pq.read_table(ray_run / "results.parquet")
    assert table.num_rows == len(rows) and table.column("path").to_pylist() == [r["path"] for r in rows]
    assert table.column("score").to_pylist() == [r.get("score") for r in rows]


def test_resume_after_the_driver_stopped(ray_run, ckpt, images, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ray_run, out)
    full = (out / "results.jsonl").read_text().splitlines(keepends=True)
    # the driver killed after 4 lines, in the middle of the 5th; the files of later lines never written
    (out / "results.jsonl").write_text("".join(full[:4]) + full[4][:20])
    for rec in map(json.loads, full[4:]):
        for f in ("map", "overlay"):
            if f in rec:
                (out / rec[f]).unlink()
    (out / "results.parquet").unlink()
    assert main(args(ckpt, images, out, "--ray", "local")) == 2  # refuses to clobber
    # through the Python API, with the files rendered in CPU tasks after the actor (the GPU layout)
    from moeclip.integrations.ray import RuntimeSpec, predict

    summary, threshold, _ = predict([str(images)], RuntimeSpec(checkpoint=str(ckpt), device="cpu"), out,
                                    objects=["screw=metal screw"], batch_size=3, actors=1, resume=True,
                                    render_in_tasks=True)
    assert (summary.skipped, summary.scored + summary.errors, threshold) == (4, len(full) - 4, None)
    assert_same_results(out, reference)
    assert (out / "results.jsonl").read_text().splitlines(keepends=True)[:4] == full[:4]  # kept, not redone
    assert (out / "results.parquet").is_file()
    # nothing left: no cluster work, no new line
    assert main(args(ckpt, images, out, "--ray", "local", "--resume")) == 0
    assert len(lines(out)) == len(full)


def test_score_dataset_for_ray_pipelines_and_uris(cluster, ckpt, images, reference):
    """A Ray Dataset of paths in (file:// URIs read through pyarrow.fs, local paths), results out."""
    from moeclip.integrations.ray import RESULT_FIELDS, RuntimeSpec, score_dataset

    paths = [(images / "screw" / f"s{i}.png").as_uri() for i in range(3)] + [str(images / "nut" / "broken.png")]
    ds = score_dataset(ray.data.from_items([{"path": p} for p in paths]), RuntimeSpec(checkpoint=str(ckpt)),
                       object="metal screw", maps=True, batch_size=2)
    rows = ds.take_all()
    assert [r["path"] for r in rows] == paths and set(RESULT_FIELDS) <= set(rows[0])
    want = {Path(r["path"]).name: r for r in lines(reference) if "/screw/" in r["path"]}
    for r in rows[:3]:
        ref = want[Path(r["path"]).name]
        # batches of 2 here, 3 in the reference: float32 of another batch grouping, scores on [0, 1]
        assert_f32_close(r["score"], ref["score"], scale=1.0) and r["error"] is None
        assert_f32_close(r["raw_score"], ref["raw_score"], scale=1.0)
        assert r["object"] == "metal screw" and r["anomaly_map"].shape == (ref["height"], ref["width"])
    assert rows[3]["score"] is None and "broken.png" in rows[3]["error"]


def test_clear_errors_without_ray_or_with_a_bad_address(ckpt, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(args(ckpt, images, tmp_path / "o", "--ray")) == 2
    assert "pip install 'moeclip[ray]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(ckpt), "--ray", str(images), "--out", str(tmp_path / "o")])
    assert "not a Ray address" in capsys.readouterr().err


def test_uri_inputs_are_listed_like_local_ones(images):
    """Folders, globs and files named by URI (pyarrow.fs): the files predict would take, the same objects."""
    from moeclip.inference.pipeline import ObjectRules, expand_inputs
    from moeclip.integrations.ray import list_inputs

    rules = ObjectRules.from_args(["screw=metal screw"], None)
    local = expand_inputs([str(images)])
    rules.assign(local)
    remote = list_inputs([images.as_uri()], rules)
    assert [j.key for j in remote] == [Path(j.path).resolve().as_uri() for j in local]
    assert [(j.object, j.source) for j in remote] == [(j.object, j.source) for j in local]
    assert [j.label for j in list_inputs([images.as_uri() + "/nut/*.png"])] == \
        [(images / "nut" / f).as_uri() for f in ("broken.png", "n0.png", "n1.png", "n2.png", "n3.png", "n4.png",
                                                  "s0.png")]
    assert len(list_inputs([images.as_uri() + "/**/*.png"])) == len(local)
    assert [j.key for j in list_inputs([images.as_uri() + "/nut/none.png"])] == [images.as_uri() + "/nut/none.png"]


def test_a_run_that_cannot_start_leaves_a_rerunnable_folder(ckpt, images, tmp_path, monkeypatch, capsys):
    """A Ray connection failure creates nothing in --out: the same command without --ray then runs."""
    from moeclip.integrations import ray as moeray

    def refuse(*a, **k):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(moeray, "match_auth_mode", lambda address: None)
    out = tmp_path / "out"
    assert main(args(ckpt, images, out, "--ray", "auto")) == 2
    assert "no Ray cluster to join" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    assert main(args(ckpt, images, out)) == 0
    assert len(lines(out)) == 13  # 12 images and the unreadable one
    # what an earlier version left after such a failure (an empty results.jsonl, empty folders) is no run
    left = tmp_path / "left"
    (left / "maps").mkdir(parents=True)
    (left / "overlays").mkdir()
    (left / "results.jsonl").touch()
    assert main(args(ckpt, images, left)) == 0 and len(lines(left)) == 13
    # and --overwrite deletes nothing before the first result: a failed start keeps the earlier results
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(moeray, "match_auth_mode", lambda address: None)
    before = (out / "results.jsonl").read_bytes()
    assert main(args(ckpt, images, out, "--ray", "auto", "--overwrite")) == 2
    assert (out / "results.jsonl").read_bytes() == before and len(list((out / "maps").iterdir())) == 12


def test_joins_a_cluster_in_its_authentication_mode(tmp_path, monkeypatch, capsys):
    """Ray >= 2.59: a driver that finds a token sends it; a cluster without authentication then fails
    with InvalidAuthToken. With a token here and a cluster that answers without one, join without."""
    from moeclip.integrations import ray as moeray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    probed = []
    monkeypatch.setattr(moeray, "cluster_without_auth", lambda a: probed.append(a) or True)
    assert moeray.match_auth_mode("auto") is None and probed == []  # no token here: nothing to match
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    assert moeray.match_auth_mode("ray://head:10001") is None  # Ray Client: left to Ray
    assert moeray.match_auth_mode("auto") == "disabled" and probed == ["auto"]
    assert "RAY_AUTH_MODE=disabled" in capsys.readouterr().err
    import os

    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    assert moeray.match_auth_mode("auto") is None  # set (by the user, or above): respected
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setattr(moeray, "cluster_without_auth", lambda a: False)  # a cluster with tokens
    assert moeray.match_auth_mode("10.0.0.1:6379") is None and "RAY_AUTH_MODE" not in os.environ
    # a cluster that wants a token this machine lacks: one clear line
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def no_token(*a, **k):
        raise RuntimeError("Token authentication is enabled but no authentication token was found")

    monkeypatch.setattr(ray, "init", no_token)
    with pytest.raises(moeray.MoECLIPError, match="ray get-auth-token"):
        moeray.connect("10.0.0.1:6379")
