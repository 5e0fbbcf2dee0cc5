"""Start-up: in the ``moeclip`` command's process the demo, training and predict paths import neither
torch._dynamo nor torchvision.models/ops, and the packages it defers (torchvision.models/ops/datasets,
timm) still work when used; in a user's program moeclip defers nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

HEAVY = ("torch._dynamo", "torchvision.models", "torchvision.ops", "torchvision.datasets", "timm", "timm.models")

CHECK = """
import sys
from moeclip._imports import _LOADER_KEY
loaded = [m for m in {heavy!r} if m in sys.modules and _LOADER_KEY not in vars(sys.modules[m])]
assert not loaded, f"loaded at start-up: {{loaded}}"
"""


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


#: what the ``moeclip`` entry point does first (the command owns its process)
AS_THE_COMMAND = "from moeclip._imports import defer_heavy_imports; defer_heavy_imports()\n"


def test_training_and_demo_path_stays_light(tiny_clip_config, tmp_path):
    """Build the model, run a training step on an augmented, preprocessed image, score it."""
    code = AS_THE_COMMAND + f"""
import torch
from PIL import Image
from moeclip.data.transforms import JointAugment, preprocess_image
from moeclip.engine import demo, evaluate, train  # noqa: F401
from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
from moeclip.model.moeclip import MoECLIP
from moeclip.model.scoring import anomaly_map  # noqa: F401
model = MoECLIP.from_config(ModelConfig(BackboneConfig(model={str(tiny_clip_config)!r}, pretrained=None,
                                                       image_size=64), AdapterConfig())).train()
img = preprocess_image(Image.new("RGB", (80, 60), (120, 30, 200)), 64)
img, mask = JointAugment()(img, torch.zeros(1, 64, 64))
losses = model.compute_losses(img[None], mask[None], torch.zeros(1), model.text_features("object"))
losses["total"].backward()
model.eval().predict(img[None], "object")
""" + CHECK.format(heavy=HEAVY)
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_predict_cli_stays_light(export_ckpt, export_images, tmp_path):
    """``main()`` without arguments reads this process's command line, as the ``moeclip`` entry point."""
    code = f"""
import sys
sys.argv = ["moeclip", "predict", "--checkpoint", {str(export_ckpt)!r}, {str(export_images / 'img1.png')!r},
            "--object", "nut", "--out", {str(tmp_path / 'out')!r}]
from moeclip.cli import main
assert main() == 0
""" + CHECK.format(heavy=HEAVY)
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "results.jsonl").is_file()


def test_deferred_packages_load_on_first_use(tmp_path):
    """What moeclip deferred behaves as if imported normally: attributes, from-imports, star-imports."""
    code = AS_THE_COMMAND + """
import sys
import torch
from moeclip._imports import _LOADER_KEY, import_open_clip, light_torchvision
open_clip = import_open_clip()
light_torchvision()
import timm, torchvision
assert _LOADER_KEY in vars(sys.modules["timm"]) and _LOADER_KEY in vars(sys.modules["torchvision.ops"])
assert isinstance(timm.__version__, str)  # the first attribute runs timm's own __init__
assert open_clip.timm_model.timm is timm and callable(timm.create_model)
boxes = torch.tensor([[0., 0, 2, 2], [0, 0, 2, 2.1], [5, 5, 6, 6]])
keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
from torchvision.models import resnet18
assert resnet18(num_classes=3).fc.out_features == 3
from torchvision.ops import *  # noqa: F403  (needs the real __all__)
assert callable(box_iou)  # noqa: F405
import torchvision.datasets as datasets
assert datasets.ImageFolder.__name__ == "ImageFolder"
assert not any(_LOADER_KEY in vars(sys.modules[m]) for m in ("timm", "torchvision.ops", "torchvision.models"))
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_nothing_is_deferred_when_torchvision_came_first(tmp_path):
    code = AS_THE_COMMAND + """
import sys
import torchvision  # the user's own import, before moeclip's
from moeclip._imports import _LOADER_KEY, import_open_clip
import_open_clip()
assert type(sys.modules["torchvision.ops"]).__name__ == "module"
assert _LOADER_KEY not in vars(sys.modules["torchvision.ops"])
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_library_users_get_the_real_torchvision(tmp_path):
    """A program (not the moeclip command) that imports moeclip first gets torchvision untouched."""
    code = """
import sys, types
import moeclip
import moeclip.data.transforms
import moeclip.model.moeclip  # open_clip too
import torchvision.models
import torchvision.ops
for name in ("torchvision.models", "torchvision.ops", "torchvision.datasets"):
    mod = sys.modules[name]
    assert type(mod) is types.ModuleType, (name, type(mod))
    assert "_moeclip_deferred_loader" not in vars(mod), name
assert "resnet18" in vars(torchvision.models)  # the package's own __init__ ran at import
assert torchvision.models.resnet18(num_classes=3).fc.out_features == 3
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cli_main_with_arguments_defers_nothing(export_ckpt, export_images, tmp_path):
    """A program calling ``main([...])`` keeps its own imports: only the entry point defers."""
    code = f"""
import sys, types
from moeclip.cli import main
assert main(["predict", "--checkpoint", {str(export_ckpt)!r}, {str(export_images / 'img1.png')!r},
             "--object", "nut", "--out", {str(tmp_path / 'out')!r}]) == 0
import torchvision.ops
assert type(sys.modules["torchvision.ops"]) is types.ModuleType and "nms" in vars(torchvision.ops)
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
