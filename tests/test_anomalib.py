"""anomalib integration: Engine test/predict/export of ``MoEClip`` against ``moeclip test`` and the Detector.

The synthetic images are written at the tiny checkpoint's resolution (64 px), so neither the
image nor the ground-truth mask is resampled: what is compared is the model's maps and the
metrics, not two libraries' resize conventions (README, "anomalib", says how large those are).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_f32_close, make_tiny_checkpoint, require_extra
from PIL import Image

require_extra("anomalib")
ov = require_extra("openvino")

from anomalib.data import Folder, MVTecAD  # noqa: E402
from anomalib.deploy import ExportType  # noqa: E402
from anomalib.engine import Engine  # noqa: E402

from moeclip.cli import main  # noqa: E402
from moeclip.data.synth import generate_dataset  # noqa: E402
from moeclip.inference.detector import Detector  # noqa: E402
from moeclip.integrations.anomalib import MoEClip  # noqa: E402
from moeclip.model.checkpoint import load_model  # noqa: E402

CATEGORY = "wood"
SIZE = 64


@pytest.fixture(scope="module")
def ckpt(tiny_clip_config, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tiny_clip_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, categories=[CATEGORY], n_normal=6, n_anomalous=6, image_size=SIZE, seed=0, n_train=2)
    return root


def engine(root: Path) -> Engine:
    """CPU, no logger, no progress bar; every file (checkpoint callback, images) under ``root``."""
    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


@pytest.fixture(scope="module")
def tested(ckpt, synth, tmp_path_factory):
    """One ``Engine.test`` on anomalib's MVTecAD datamodule; the description comes from its category."""
    model = MoEClip(checkpoint=ckpt, visualizer=False)
    dm = MVTecAD(root=synth, category=CATEGORY, eval_batch_size=4, num_workers=0)
    results = engine(tmp_path_factory.mktemp("engine"))
    return model, results.test(model, datamodule=dm)[0]


def test_pixel_auroc_equals_moeclip_test(tested, ckpt, synth, tmp_path):
    model, metrics = tested
    from moeclip.data.registry import describe, get_dataset

    # MVTecAD's category, described as moeclip describes MVTec classes
    assert model.model.object == describe(get_dataset("MVTec"), CATEGORY) != CATEGORY
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({CATEGORY: model.model.object}))
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(ckpt), "--data", f"folder={synth}", "--descriptions", str(desc),
                 "--out", str(out), "--device", "cpu"]) == 0
    ours = json.loads((out / "results.json").read_text())["datasets"][0]["per_class"][CATEGORY]
    assert ours["num_images"] == 12
    assert metrics["pixel_AUROC"] == pytest.approx(ours["pixel_auroc"], abs=1e-3)
    # image AUROC: anomalib ranks the single-image score, the paper normalises per class first
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    print(f"pixel AUROC anomalib {metrics['pixel_AUROC']:.6f} moeclip {ours['pixel_auroc']:.6f}; "
          f"image AUROC anomalib {metrics['image_AUROC']:.6f} moeclip {ours['image_auroc']:.6f}")


@pytest.fixture(scope="module")
def detector(ckpt) -> Detector:
    return Detector(load_model(ckpt), device="cpu")


def test_predict_data_path_equals_detector(ckpt, synth, detector, tmp_path):
    """No datamodule, no validation: the outputs are the raw map and moeclip predict's score."""
    folder = synth / CATEGORY / "test" / "hole"
    model = MoEClip(checkpoint=ckpt, visualizer=False)
    preds = engine(tmp_path).predict(model=model, data_path=folder)
    paths = [p for b in preds for p in b.image_path]
    maps = torch.cat([b.anomaly_map for b in preds]).numpy()
    scores = torch.cat([b.pred_score.reshape(-1) for b in preds]).numpy()
    assert len(paths) == len(list(folder.glob("*.png"))) > 0
    ref = detector.predict(paths, object="object")
    for m, s, r in zip(maps, scores, ref):
        # anomalib's batches vs the Detector's: float32 of another batch grouping, relative to the magnitude
        assert_f32_close(m.reshape(SIZE, SIZE), r.anomaly_map)
        assert_f32_close(s, r.score, scale=1.0)


def test_predict_folder_datamodule(tested, synth, tmp_path):
    model, _ = tested
    dm = Folder(name="synth", root=synth / CATEGORY, normal_dir="test/good", abnormal_dir="test/hole",
                mask_dir="ground_truth/hole", eval_batch_size=4, num_workers=0)
    preds = engine(tmp_path).predict(model, datamodule=dm)
    assert model.model.object == "object"  # a Folder datamodule has no category: the generic description
    batch = preds[0]
    assert batch.anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert torch.all((batch.pred_score >= 0) & (batch.pred_score <= 1))  # normalised by the post-processor
    assert batch.pred_label is not None


@pytest.mark.slow
def test_export_openvino_equals_pytorch(ckpt, tmp_path):
    """``Engine.export(OPENVINO)`` (anomalib's dynamo ONNX export, then OpenVINO) gives PyTorch's maps.

    The graph includes the pre-processor, so it takes [0, 1] images; at the model's size the
    (export-time, non-antialiased) resize is the identity.
    """
    model = MoEClip(checkpoint=ckpt, class_name="wood grain", visualizer=False).eval()
    path = engine(tmp_path).export(model, ExportType.OPENVINO, export_root=tmp_path / "export")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [next(iter(sorted(o.get_names()))) for o in ov.Core().read_model(str(path)).outputs]
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, SIZE, SIZE), dtype=np.float32)
    got = dict(zip(names, compiled(x).values()))
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    # OpenVINO's kernels vs PyTorch's: float32 relative to the maps' magnitude, scores on [0, 1]
    assert_f32_close(np.asarray(got["anomaly_map"]).reshape(2, SIZE, SIZE), ref.anomaly_map.reshape(2, SIZE, SIZE))
    assert_f32_close(np.asarray(got["pred_score"]).reshape(-1), ref.pred_score.reshape(-1), scale=1.0)


def test_model_options_and_few_shot_are_checked(ckpt):
    from moeclip.errors import MoECLIPError

    with pytest.raises(MoECLIPError, match="unknown model option"):
        MoEClip(checkpoint=ckpt, no_such_flag=1)
    for k in (1, -1):
        with pytest.raises(MoECLIPError, match="k_shot must be 0"):
            MoEClip(checkpoint=ckpt, k_shot=k)
    with pytest.raises(MoECLIPError, match="reference-weight"):
        MoEClip(checkpoint=ckpt, k_shot=2, reference_weight=2.0)


def test_k_shot_draws_training_normals_and_equals_predict_reference(ckpt, synth, tmp_path):
    """``MoEClip(k_shot=2)``: the references are the datamodule's training normals (the draw of
    ``moeclip test --shots 2``), and the maps are ``moeclip predict --reference``'s with them."""
    from moeclip.data.references import draw_shots

    model = MoEClip(checkpoint=ckpt, k_shot=2, reference_weight=0.4, post_processor=False, evaluator=False,
                    visualizer=False)
    dm = MVTecAD(root=synth, category=CATEGORY, eval_batch_size=4, num_workers=0)
    preds = engine(tmp_path / "engine").predict(model=model, datamodule=dm)
    pool = sorted((synth / CATEGORY / "train" / "good").glob("*.png"))
    assert model.references == [str(p) for p in draw_shots(pool, 2, 0)]
    paths = [p for b in preds for p in b.image_path]
    maps = torch.cat([b.anomaly_map for b in preds]).numpy().reshape(len(paths), SIZE, SIZE)
    scores = torch.cat([b.pred_score.reshape(-1) for b in preds]).numpy()
    assert len(paths) == 12 and len(pool) == 2  # the fixture's two training normals: --reference their folder
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", *paths, "--out", str(out),
                 "--object", model.model.object, "--reference", str(pool[0].parent), "--reference-weight", "0.4"]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = {str(Path(r["path"]).resolve()): r for r in map(json.loads, lines)}
    for path, m, s in zip(paths, maps, scores):
        row = rows[str(Path(path).resolve())]
        ref = np.load(out / row["map"])
        assert row["references"] == 2
        np.testing.assert_allclose(m, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
        assert s == pytest.approx(row["score"], abs=1e-5)
        assert s == pytest.approx(row["score"], abs=1e-5)


def test_pre_processor_is_moeclip_preprocessing(ckpt):
    """CLIP normalisation at the checkpoint's size (where the bicubic resize is the identity)."""
    from moeclip.data.transforms import preprocess_image

    model = MoEClip(checkpoint=ckpt, visualizer=False)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float()[None] / 255
    got = model.pre_processor.transform(x)
    torch.testing.assert_close(got[0], preprocess_image(img, SIZE), atol=1e-6, rtol=0)


def test_clear_error_without_anomalib(tmp_path):
    """``import moeclip`` needs no anomalib; the integration says how to install it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "sys.modules['anomalib'] = None\n"
            "import moeclip, moeclip.inference.openvino\n"
            "from moeclip.errors import MoECLIPError\n"
            "try:\n"
            "    import moeclip.integrations.anomalib\n"
            "except MoECLIPError as exc:\n"
            "    print(exc)\n")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "pip install 'moeclip[anomalib]'" in done.stdout
