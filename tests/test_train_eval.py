"""End-to-end: synthetic data -> train -> checkpoint -> zero-shot test; resume; torchrun with 2 processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_metrics, child_env, run_launchers, train_args
from safetensors.torch import load_file

from moeclip.cli import main


def test_train_then_test(synth, tiny_clip_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(synth, tiny_clip_config, run, "--epochs", "1")) == 0
    ckpt = run / "checkpoint"
    assert (ckpt / "adapters.safetensors").is_file() and (ckpt / "clip.safetensors").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,loss,ce,seg,etf,balance") and len(rows) == 1 + 3  # 12 images / 4
    # refusing to clobber the run
    assert main(train_args(synth, tiny_clip_config, run, "--epochs", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["test", "--checkpoint", str(ckpt), "--data", f"folder={synth / 'held'}", "--out", str(out),
                 "--save-maps", "--visualize"]) == 0
    res = json.loads((out / "results.json").read_text())
    per_class = res["datasets"][0]["per_class"]
    assert list(per_class) == ["wood"]
    m = per_class["wood"]
    assert m["num_images"] == 6 and m["num_anomalous"] == 3
    for key in ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "image_auroc", "image_ap"):
        assert 0.0 <= m[key] <= 1.0
    assert len(list((out / "maps").rglob("*.npy"))) == 6 and len(list((out / "overlays").rglob("*.png"))) == 6
    assert (out / "results.csv").read_text().startswith("dataset,class,pixel_auroc")
    printed = capsys.readouterr().out
    assert "| wood |" in printed and "**average**" in printed
    table = (out / "results.md").read_text()  # the printed table, also as a file
    assert "| wood |" in table and table.strip() in printed
    # same inputs, same numbers
    out2 = tmp_path / "eval2"
    main(["test", "--checkpoint", str(ckpt), "--data", f"folder={synth / 'held'}", "--out", str(out2)])
    assert json.loads((out2 / "results.json").read_text())["datasets"] == res["datasets"]


def test_resume_reaches_the_same_weights(synth, tiny_clip_config, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(synth, tiny_clip_config, full, "--epochs", "2", "--seed", "7")) == 0
    assert main(train_args(synth, tiny_clip_config, part, "--epochs", "1", "--seed", "7")) == 0
    assert main(train_args(synth, tiny_clip_config, part, "--epochs", "2", "--seed", "7", "--resume")) == 0
    a = load_file(str(full / "checkpoint" / "adapters.safetensors"))
    b = load_file(str(part / "checkpoint" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().sum() > 0 for k in moved)  # training did something
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    # the resumed checkpoint still holds the random CLIP it was trained on: it loads, and resumes again
    from moeclip.model.checkpoint import load_model

    ckpt = part / "checkpoint"
    doc = json.loads((ckpt / "config.json").read_text())["model"]["backbone"]
    assert (ckpt / doc["pretrained"]).is_file() and (ckpt / doc["model"]).is_file(), doc
    load_model(ckpt)
    assert main(train_args(synth, tiny_clip_config, part, "--epochs", "3", "--seed", "7", "--resume")) == 0
    load_model(ckpt)


def test_training_without_masks_is_refused(tmp_path, tiny_clip_config, capsys):
    root = tmp_path / "nomask" / "part" / "test"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir(parents=True)
    from PIL import Image

    for d in ("good", "bad"):
        Image.new("RGB", (64, 64)).save(root / d / "000.png")
    code = main(["train", "--data", f"folder={tmp_path / 'nomask'}", "--out", str(tmp_path / "r"),
                 "--clip-model", str(tiny_clip_config), "--clip-weights", "none", "--image-size", "64"])
    err = capsys.readouterr().err
    # a clear one-line refusal naming the file, before any training (no run folder content)
    assert code == 2 and "training needs masks" in err and str(root / "bad" / "000.png") in err
    assert not (tmp_path / "r" / "checkpoint").exists()


def _torchrun(args, cwd):
    """torchrun with 2 processes; its logs and temporary files inside ``cwd``, every process ended on return."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(cwd / "elastic"), "-m", "moeclip", *args]
    [(code, out)] = run_launchers([cmd], cwd, child_env(cwd), timeout=300)
    assert code == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def clip_weights(tiny_clip_config, tmp_path_factory):
    """The tiny CLIP as a weight file: training then keeps only adapters (and casts for bf16)."""
    from safetensors.torch import save_file

    from moeclip.model.backbone import create_clip
    from moeclip.model.config import BackboneConfig

    torch.manual_seed(4)
    clip = create_clip(BackboneConfig(model=str(tiny_clip_config), pretrained=None, image_size=64))
    path = tmp_path_factory.mktemp("clipw") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torchrun_two_processes_train_like_one_big_batch(synth, tiny_clip_config, clip_weights, tmp_path, precision):
    """DDP with gloo: both ranks hold identical weights after training (checked through a
    hash the ranks exchange) and only rank 0 writes the checkpoint; bf16 with the frozen
    weights cast (a weight file, so the checkpoint keeps adapters only)."""
    run = tmp_path / "ddp"
    args = train_args(synth, tiny_clip_config, run, "--epochs", "1", "--batch-size", "2", "--precision", precision)
    if precision == "bf16":
        args[args.index("--clip-weights") + 1] = str(clip_weights)
    _torchrun(args, tmp_path)
    assert (run / "checkpoint" / "adapters.safetensors").is_file()
    ranks = json.loads((run / "checkpoint" / "config.json").read_text())["meta"]
    assert ranks["world_size"] == 2 and len(set(ranks["weight_digests"])) == 1


@pytest.mark.slow
def test_torchrun_two_process_evaluation_equals_one_process(synth, tiny_clip_config, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(synth, tiny_clip_config, run, "--epochs", "1")) == 0
    args = ["test", "--checkpoint", str(run / "checkpoint"), "--data", f"folder={synth / 'held'}", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["datasets"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["datasets"]
    # same images, same metrics (float32 maps of another batch grouping and thread count: see assert_same_metrics)
    assert one[0]["per_class"].keys() == two[0]["per_class"].keys()
    for cls, m in one[0]["per_class"].items():
        assert_same_metrics(m, two[0]["per_class"][cls])


@pytest.mark.slow
def test_resume_refuses_other_data_or_settings(synth, tiny_clip_config, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert main(train_args(synth, tiny_clip_config, run, "--epochs", "1", "--seed", "7")) == 0
    before = (run / "checkpoint" / "adapters.safetensors").read_bytes()
    capsys.readouterr()
    # other data: the held-out folder instead of the training one
    args = train_args(synth, tiny_clip_config, run, "--epochs", "2", "--seed", "7", "--resume")
    args[args.index("--data") + 1] = f"folder={synth / 'held'}"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data" in err and str((synth / "train").resolve()) in err and str((synth / "held").resolve()) in err
    assert "12 -> 6" in err and "another --out" in err
    # other optimiser and model settings
    assert main(train_args(synth, tiny_clip_config, run, "--epochs", "2", "--seed", "7", "--resume",
                           "--gamma", "0.1", "--experts", "2")) == 2
    err = capsys.readouterr().err
    assert "optimiser gamma 0.5 -> 0.1" in err and "model adapter.num_experts 4 -> 2" in err
    # the same data moved elsewhere (resolved paths differ, content the same): resumes
    moved = tmp_path / "moved" / "train"
    shutil.copytree(synth / "train", moved)
    args = train_args(synth, tiny_clip_config, run, "--epochs", "2", "--seed", "7", "--resume")
    args[args.index("--data") + 1] = f"folder={moved}"
    assert (run / "checkpoint" / "adapters.safetensors").read_bytes() == before  # refusals changed nothing
    assert main(args) == 0
    assert "same content: resuming" in capsys.readouterr().out
    # the same names with another content (an image rewritten, other size) is other data
    img = sorted((moved / "disc" / "test" / "good").glob("*.png"))[0]
    img.write_bytes(img.read_bytes() + b"\0")
    assert main(args) == 2
    assert "other images (12 -> 12" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_weights(synth, tiny_clip_config, tmp_path):
    """SIGKILL in the middle of epoch 2, --resume, compare with an uninterrupted run."""
    import signal

    from moeclip.engine.train import KILL_ENV

    full, killed = tmp_path / "full", tmp_path / "killed"
    env = child_env(tmp_path)  # one thread everywhere (bitwise comparable); temporary files in tmp_path
    cli = [sys.executable, "-m", "moeclip"]
    base = train_args(synth, tiny_clip_config, full, "--epochs", "3", "--seed", "5", "--batch-size", "2")
    subprocess.run([*cli, *base], env=env, check=True, capture_output=True)
    args = train_args(synth, tiny_clip_config, killed, "--epochs", "3", "--seed", "5", "--batch-size", "2")
    # 6 steps per epoch: the trainer's test hook SIGKILLs the process itself after step 8, in the second epoch
    # (a deterministic kill point; polling metrics.csv and killing from here raced the end of the epoch)
    proc = subprocess.run([*cli, *args], env={**env, KILL_ENV: "8"}, capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len((killed / "metrics.csv").read_text().splitlines()) == 1 + 8  # header + steps 1-8, no more
    state = json.loads((killed / "checkpoint" / "config.json").read_text())["meta"]
    assert state["epoch"] == 1 and state["step"] == 6  # the epoch-2 checkpoint was never written
    subprocess.run([*cli, *args, "--resume"], env=env, check=True, capture_output=True)
    a = load_file(str(full / "checkpoint" / "adapters.safetensors"))
    b = load_file(str(killed / "checkpoint" / "adapters.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_validation_keeps_the_best_checkpoint(synth, tiny_clip_config, clip_weights, tmp_path):
    """``best`` holds the epoch with the highest validation score of the run's log (each epoch's checkpoint
    records its score), and re-testing the ``best`` weights gives that score."""
    run = tmp_path / "val"
    val = ["--val", f"folder={synth / 'held'}", "--seed", "2"]
    scores = {}
    for epochs in (1, 2):  # one epoch at a time (--resume), reading each epoch's logged score
        extra = ["--resume"] if epochs > 1 else []
        args = train_args(synth, tiny_clip_config, run, "--epochs", str(epochs), *val, *extra)
        args[args.index("--clip-weights") + 1] = str(clip_weights)  # a weight file: checkpoints keep adapters only
        assert main(args) == 0
        meta = json.loads((run / "checkpoint" / "config.json").read_text())["meta"]
        assert meta["epoch"] == epochs
        scores[epochs] = meta["metrics"]["val"]["score"]
    best = json.loads((run / "best" / "config.json").read_text())["meta"]
    best_epoch = max(scores, key=lambda e: (scores[e], -e))  # the first epoch reaching the maximum
    assert best["epoch"] == best_epoch and best["pixel_auroc"] == scores[best_epoch]
    out = tmp_path / "retest"
    assert main(["test", "--checkpoint", str(run / "best"), "--data", f"folder={synth / 'held'}",
                 "--out", str(out)]) == 0
    retest = json.loads((out / "results.json").read_text())["datasets"][0]["per_class"]["wood"]["pixel_auroc"]
    # another batch grouping may reorder float32 near-ties among 24576 pixels: a few 1e-6 of AUROC at most
    assert retest == pytest.approx(best["pixel_auroc"], abs=1e-4)


def test_bf16_training_casts_frozen_weights_with_identical_results(synth, tiny_clip_config, clip_weights, tmp_path,
                                                                  monkeypatch):
    """--precision bf16 stores the frozen CLIP in bf16 (not when the checkpoint keeps the CLIP):
    the trained adapters are bit-identical either way."""
    from moeclip.model.moeclip import MoECLIP

    cast_calls = []
    original = MoECLIP.cast_frozen_weights

    def spy(self, precision):
        out = original(self, precision)
        cast_calls.append(self.frozen_dtype)
        return out

    monkeypatch.setattr(MoECLIP, "cast_frozen_weights", spy)

    weights = clip_weights
    runs = {}
    for name, extra in (("cast", []), ("plain", ["--include-backbone"])):
        args = train_args(synth, tiny_clip_config, tmp_path / name, "--epochs", "1", "--precision", "bf16", *extra)
        args[args.index("--clip-weights") + 1] = str(weights)
        cast_calls.clear()
        assert main(args) == 0
        assert cast_calls == ([torch.bfloat16] if name == "cast" else [])
        runs[name] = load_file(str(tmp_path / name / "checkpoint" / "adapters.safetensors"))
    assert not (tmp_path / "cast" / "checkpoint" / "clip.safetensors").exists()
    assert (tmp_path / "plain" / "checkpoint" / "clip.safetensors").exists()
    a, b = runs["cast"], runs["plain"]
    assert a.keys() == b.keys() and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    assert all(torch.equal(a[k], b[k]) for k in a)
    args = train_args(synth, tiny_clip_config, tmp_path / "cast", "--epochs", "2", "--precision", "bf16", "--resume")
    args[args.index("--clip-weights") + 1] = str(weights)
    assert main(args) == 0  # resuming a cast run reloads the adapters into a cast model
    resumed = load_file(str(tmp_path / "cast" / "checkpoint" / "adapters.safetensors"))
    assert any(not torch.equal(resumed[k], a[k]) for k in a)
    out = tmp_path / "eval"
    assert main(["test", "--checkpoint", str(tmp_path / "cast" / "checkpoint"), "--data", f"folder={synth / 'held'}",
                 "--out", str(out), "--precision", "bf16"]) == 0
    m = json.loads((out / "results.json").read_text())["datasets"][0]["per_class"]["wood"]
    assert 0.0 <= m["pixel_auroc"] <= 1.0


def test_adam_is_fused_on_cpu_and_steps_like_the_loop():
    """The trainer's Adam runs as one fused kernel on CPU; one step equals torch's per-parameter loop."""
    from moeclip.engine.train import _fused

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    assert _fused(params) == {"fused": True}
    assert _fused([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]) == {}
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.999), **_fused(params))
    loop = torch.optim.Adam(twins, lr=1e-2, betas=(0.5, 0.999), foreach=False)
    for _ in range(3):
        for group in (params, twins):
            for p in group:
                p.grad = torch.cos(p.detach() * 3)
        fused.step()
        loop.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_keeps_a_stored_clip_without_the_flag(synth, tiny_clip_config, clip_weights, tmp_path):
    """A run that stored its CLIP (--include-backbone) keeps it on --resume: the save replaces that folder."""
    from moeclip.model.checkpoint import CLIP_WEIGHTS_FILE, load_model

    run = tmp_path / "run"
    args = train_args(synth, tiny_clip_config, run, "--epochs", "1", "--max-steps", "2")
    args[args.index("--clip-weights") + 1] = str(clip_weights)
    assert main([*args, "--include-backbone"]) == 0
    args[args.index("--epochs") + 1] = "2"
    args[args.index("--max-steps") + 1] = "4"
    assert main([*args, "--resume"]) == 0
    assert (run / "checkpoint" / CLIP_WEIGHTS_FILE).is_file()
    load_model(run / "checkpoint")
