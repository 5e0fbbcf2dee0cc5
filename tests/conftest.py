"""Shared fixtures: the golden fixture of the official code (tests/golden/) and a tiny open_clip config."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: The official code's outputs on a tiny random CLIP; data kept in the repository (see its README.md).
GOLDEN = REPO / "tests" / "golden"

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy machine

#: Under CI (``CI=true``) every extra is installed (.ci/run), so a missing one is a broken install, not a skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_extra(module: str):
    """Import an optional extra's module for the tests that need it, and return it.

    Skips only when the package is absent: one that is installed but fails to import raises its own
    error (pytest.importorskip would hide a broken install as a skip). Under CI every extra is
    installed, so an absent one fails instead of skipping. Works at module level and inside a test.
    """
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        if IN_CI:
            pytest.fail(f"optional package {top!r} is not installed, but CI=true installs every extra", pytrace=False)
        pytest.skip(f"optional package {top!r} is not installed", allow_module_level=True)
    return importlib.import_module(module)


#: Relative tolerance for float32 results computed along different paths: another batch composition (Ray
#: re-running a dead actor's images, batch 2 vs 1), thread or process count, runtime (ONNX, OpenVINO vs
#: PyTorch). Each rounds differently, and the difference grows with the magnitude of the values (a few ulps
#: of it: float32's spacing at 21.6 is 1.9e-6), so a fixed abs=1e-6 fails on one CPU and not another.
#: 1e-5 is ~84 ulps of the magnitude: room for the rounding accumulated through a forward pass, far below
#: any real defect (a wrong batch row, a missing op: errors of the order of the values themselves).
F32_RTOL = 1e-5
#: The worst error/tolerance ratio of each test, printed at the end with MOECLIP_REPORT_TOLERANCES=1.
_WORST: dict = {}


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double()
    return np.asarray(x, dtype=np.float64)


def assert_f32_close(got, want, *, scale: float | None = None, rtol: float = F32_RTOL, what: str = "") -> None:
    """``got`` within ``rtol`` of ``scale`` of ``want`` (float32 of another path, see :data:`F32_RTOL`).

    ``scale`` is the magnitude the rounding is relative to: by default the largest ``|want|`` (a map's
    magnitude, a scalar's own); pass 1.0 for scores on [0, 1] (their range), whose value may be near 0.
    """
    got, want = _as_array(got), _as_array(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if scale is None:
        scale = float(np.abs(want).max()) if want.size else 0.0
    tol = rtol * max(scale, np.finfo(np.float32).tiny)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    _WORST[test] = max(_WORST.get(test, 0.0), err / tol)
    assert err <= tol, f"{what}: max |got - want| = {err:.3g} > {tol:.3g} ({rtol:g} of magnitude {scale:.4g})"


def assert_same_metrics(got: dict, want: dict) -> None:
    """Metrics of one class (counts exact; AUROC, AP, AUPRO, F1 on [0, 1]) of the same images scored along
    another path (1 vs 2 processes): float32 maps round differently, which can only reorder pixels whose
    scores are within a few ulps, moving a metric by a few pairs out of millions: F32_RTOL of its range."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float):
            assert_f32_close(got[k], v, scale=1.0, what=k)
        else:
            assert got[k] == v, k


def _process_table() -> dict:
    """{pid: (parent pid, start time)} from /proc (Linux); empty elsewhere."""
    table = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(d.name)] = (int(fields[1]), fields[19])  # ppid, starttime: a pid reused later differs
        except (OSError, ValueError, IndexError):
            continue
    return table


def _descendants(pid: int, table: dict) -> set:
    children: dict = {}
    for child, (parent, start) in table.items():
        children.setdefault(parent, []).append((child, start))
    found, todo = set(), [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            found.add((child, start))
            todo.append(child)
    return found


def _signal(send, pid: int, sig) -> None:
    try:
        send(pid, sig)
    except ProcessLookupError:  # ended in the meantime
        pass


def run_launchers(cmds: list, cwd: Path, env: dict, timeout: float) -> list:
    """Run launcher commands (torchrun) side by side and return ``(returncode, output)`` of each.

    Each launcher starts in a process group of its own, its output goes to a file in ``cwd`` (no pipe to
    fill while another launcher is waited on). torchrun starts every worker in a session of its own, so
    killing a launcher alone would orphan its workers: the workers seen while it ran are remembered, and
    on a timeout or any other exit every launcher gets SIGTERM (torchrun then stops its workers), then its
    group and every remembered worker still alive (same pid and start time) get SIGKILL.
    """
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        logs.append(Path(cwd) / f"launcher{i}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    seen: set = set()
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            table = _process_table()
            for p in procs:
                seen |= _descendants(p.pid, table)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(c) for c in cmds], timeout)
            time.sleep(0.5)
    finally:
        running = [p for p in procs if p.poll() is None]
        for p in running:
            _signal(os.killpg, p.pid, signal.SIGTERM)
        for p in running:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal(os.killpg, p.pid, signal.SIGKILL)
                p.wait()
        table = _process_table()
        for pid, start in seen:
            if table.get(pid, (None, None))[1] == start:
                _signal(os.kill, pid, signal.SIGKILL)
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def child_env(tmp: Path) -> dict:
    """Environment of a process a test starts (a torchrun launcher, a CLI run): one thread per process, and
    TMPDIR in the test's folder (torchrun's /tmp/torchelastic_* folders, multiprocessing's /tmp/pymp-* of a
    process killed before its clean-up, anything else it creates go there)."""
    tmpdir = Path(tmp) / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmpdir))


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("MOECLIP_REPORT_TOLERANCES") and _WORST:
        terminalreporter.section("float32 comparisons: worst error / tolerance")
        for test, ratio in sorted(_WORST.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{ratio:8.3f}  {test}")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    # part of the repository: a missing file is a broken checkout, so fail rather than skip
    missing = [name for name in ("config.json", "clip_tiny.safetensors", "official_checkpoint.pth",
                                 "inputs.safetensors", "expected.safetensors", "metrics_inputs.safetensors")
               if not (GOLDEN / name).is_file()]
    if missing:
        pytest.fail(f"{GOLDEN}: golden fixture incomplete, missing {', '.join(missing)}")
    return GOLDEN


#: A small open_clip ViT config (random weights) for end-to-end tests.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def make_tiny_checkpoint(clip_config: Path, directory: Path, seed: int) -> Path:
    """A tiny random checkpoint whose experts and routers are non-trivial (the CLIP is stored in it)."""
    from moeclip.model.checkpoint import save_checkpoint
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    torch.manual_seed(seed)
    model = MoECLIP.from_config(ModelConfig(BackboneConfig(model=str(clip_config), pretrained=None, image_size=64),
                                            AdapterConfig()))
    with torch.no_grad():
        for moe in model.moe:
            moe.experts.lora_B.normal_(0, 0.05)
            moe.router.gate.weight.normal_(0, 0.5)
    return save_checkpoint(model, directory, include_backbone=True)


#: The object the export tests (ONNX, OpenVINO) describe.
EXPORT_OBJECT = "metal nut"


@pytest.fixture(scope="session")
def export_ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    """The export tests' tiny random checkpoint (experts and routers non-trivial: no routing ties)."""
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def export_detector(export_ckpt):
    from moeclip.inference.detector import Detector
    from moeclip.model.checkpoint import load_model

    return Detector(load_model(export_ckpt), device="cpu", object=EXPORT_OBJECT)


@pytest.fixture(scope="session")
def export_deploy_file(export_ckpt, tmp_path_factory) -> Path:
    """A deployment for :data:`EXPORT_OBJECT` with a threshold, a pixel threshold and a normalisation."""
    from moeclip.inference.deploy import Deployment

    dep = Deployment(object=EXPORT_OBJECT, threshold=0.4, pixel_threshold=12.0, checkpoint=str(export_ckpt),
                     normalization={"map_min": -10.0, "map_max": 40.0, "score_min": 0.4, "score_max": 0.6})
    return dep.save(tmp_path_factory.mktemp("dep") / "deploy.json")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """Synthetic folder data: ``train`` (two classes) and ``held`` (one unseen class), 3 + 3 images each."""
    from moeclip.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "train", ["stripes", "disc"], n_normal=3, n_anomalous=3, image_size=64, seed=0)
    generate_dataset(root / "held", ["wood"], n_normal=3, n_anomalous=3, image_size=64, seed=1)
    return root


def train_args(data: Path, clip_config: Path, out: Path, *extra: str, batch_size: int = 4) -> list:
    """``moeclip train`` on ``data/train`` with the tiny CLIP (random weights), 64 px, lr 1e-3."""
    return ["train", "--data", f"folder={data / 'train'}", "--out", str(out), "--clip-model", str(clip_config),
            "--clip-weights", "none", "--image-size", "64", "--batch-size", str(batch_size), "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def export_images(tmp_path_factory) -> Path:
    """Three random RGB images of different sizes and one unreadable file, for ``predict`` of an exported model."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(40, 60, 3), (64, 64, 3), (90, 50, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "bad.png").write_bytes(b"broken")
    return root


def read_rows(out: Path) -> dict:
    """``results.jsonl`` of ``predict --out out`` by file name."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {Path(r["path"]).name: r for r in rows}


def check_exported_predict(flag: str, model: Path, deploy_file: Path, folder: Path, tmp_path: Path, capsys) -> None:
    """``predict FLAG MODEL`` (``--onnx``/``--openvino``) writes the rows of ``predict --deploy`` (PyTorch),
    and the object stays the export's."""
    import numpy as np

    from moeclip.cli import main

    source = flag.lstrip("-")
    exp_out, torch_out = tmp_path / source, tmp_path / "torch"
    assert main(["predict", flag, str(model), str(folder), "--out", str(exp_out)]) == 0
    assert main(["predict", "--deploy", str(deploy_file), "--device", "cpu", str(folder),
                 "--out", str(torch_out)]) == 0
    a, b = read_rows(exp_out), read_rows(torch_out)
    assert set(a) == set(b) == {"img0.png", "img1.png", "img2.png", "bad.png"}
    assert "error" in a["bad.png"]
    for name in ("img0.png", "img1.png", "img2.png"):
        ra, rb = a[name], b[name]
        assert ra["object"] == EXPORT_OBJECT and ra["object_source"] == source
        assert set(ra) - {"object_source"} == set(rb) - {"object_source"}
        # another runtime's kernels: float32 relative to the map's magnitude, scores on [0, 1]
        assert_f32_close(np.load(exp_out / ra["map"]), np.load(torch_out / rb["map"]), what=name)
        assert_f32_close(ra["raw_score"], rb["raw_score"], scale=1.0, what=name)
        assert_f32_close(ra["score"], rb["score"], scale=1.0, what=name)
        assert ra["decision"] == rb["decision"] and ra["threshold"] == 0.4
        assert (exp_out / ra["overlay"]).is_file() and (exp_out / ra["mask"]).is_file()

    # the object is fixed by the export
    assert main(["predict", flag, str(model), "--object", "screw", str(folder),
                 "--out", str(tmp_path / "x")]) == 2
    assert "exported for 'metal nut'" in capsys.readouterr().err


def check_predict_without_torch(flag: str, model: Path, folder: Path, out: Path) -> None:
    """``predict FLAG MODEL`` imports neither torch nor the model (a fresh interpreter checks sys.modules)."""
    import os
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from moeclip.cli import predict\n"
        "p = argparse.ArgumentParser(); predict.register(p.add_subparsers())\n"
        f"args = p.parse_args(['predict', {flag!r}, {str(model)!r}, {str(folder)!r}, '--out', {str(out)!r}])\n"
        "assert predict.run(args) == 0\n"
        "loaded = [m for m in ('torch', 'moeclip.model.moeclip', 'moeclip.inference.detector') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
