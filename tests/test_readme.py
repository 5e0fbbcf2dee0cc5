"""The README as a new user reads it: its Python snippet runs, its commands do not collide."""
from __future__ import annotations

import torch
from readme_check import code_blocks


def _model_snippet(tiny_clip_config) -> str:
    """The "Python API" block's model-level part, on the tiny CLIP at 64 px instead of ViT-L at 518."""
    block = next(b for sec, b in code_blocks("python") if sec == "Python API")
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model = MoECLIP.from_config"))
    code = "\n".join(lines[start:])
    assert 'BackboneConfig("ViT-L-14-336", None, 518)' in code and "518, 518" in code
    code = code.replace('"ViT-L-14-336"', repr(str(tiny_clip_config))).replace("518", "64")
    return "import torch\nfrom moeclip import MoECLIP, ModelConfig, BackboneConfig, AdapterConfig\n" + code


def test_python_api_snippet_predict_then_train(tiny_clip_config, capsys):
    # predict() (inference mode) first, then a training step on the same model: nothing that
    # predict cached may be an inference tensor, or backward fails
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(_model_snippet(tiny_clip_config), "README.md:Python API", "exec"), ns)
    model = ns["model"]
    assert model.training
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(ns["losses"]["total"])


def test_predict_on_a_training_mode_model_is_deterministic(tiny_clip_config):
    # a fresh model is in training mode: predict must still not draw LoRA dropout
    from moeclip import AdapterConfig, BackboneConfig, ModelConfig, MoECLIP

    torch.manual_seed(0)
    model = MoECLIP.from_config(ModelConfig(BackboneConfig(str(tiny_clip_config), None, 64), AdapterConfig()))
    with torch.no_grad():
        for moe in model.moe:
            moe.experts.lora_B.normal_(0, 0.05)
    images = torch.randn(2, 3, 64, 64)
    a = model.predict(images, "object")["anomaly_map"]
    b = model.predict(images, "object")["anomaly_map"]
    model.eval()
    c = model.predict(images, "object")["anomaly_map"]
    assert torch.equal(a, b) and torch.equal(a, c)
    model.train()
    assert model.training  # predict put it back


def test_readme_examples_write_to_their_own_folders():
    # followed top to bottom, a second run into a used --out is refused ("folder is not empty")
    from readme_check import out_collisions, out_folder, readme_commands

    cmds = readme_commands()
    outs = [out_folder(c) for _, c in cmds]
    assert sum(o is not None for o in outs) >= 30  # the extraction found the examples
    assert out_collisions(cmds) == {}


def test_readme_names_the_tests_that_need_the_shared_folder():
    # tests reading ../shared skip on a plain clone: the README must say which and why
    from pathlib import Path

    from readme_check import README

    text = README.read_text()
    needing = sorted(p.name for p in Path(__file__).parent.glob("test_*.py")
                     if '"shared"' in p.read_text() and p.name != Path(__file__).name)
    assert needing  # the official lists are read from ../shared by some tests
    assert "../shared/datasets/official-metadata/" in text
    assert [n for n in needing if f"tests/{n}" not in text] == []


def _result_lines_paragraph() -> str:
    from readme_check import README

    text = README.read_text()
    start = text.index("**Result lines**")
    return text[start:text.index("\n\n", start)]


def test_readme_lists_the_result_line_fields_as_written(tiny_clip_config, tmp_path):
    """Every field predict writes, in the order it writes them, is in the README's "Result lines"."""
    import json

    import numpy as np
    from conftest import make_tiny_checkpoint
    from PIL import Image

    from moeclip.cli import main

    ck = make_tiny_checkpoint(tiny_clip_config, tmp_path / "ck", seed=0)
    imgs, refs = tmp_path / "imgs", tmp_path / "refs"
    imgs.mkdir()
    refs.mkdir()
    rng = np.random.default_rng(0)
    for folder, n in ((imgs, 2), (refs, 2)):
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"i{i}.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    runs = {"thresholds": ["--threshold", "0.5", "--pixel-threshold", "0"], "few-shot": ["--reference", str(refs)]}
    lines = []
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["predict", "--checkpoint", str(ck), "--device", "cpu", str(imgs), "--out", str(out), *extra]) == 0
        lines += [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    doc = _result_lines_paragraph()
    keys = {k for line in lines for k in line}
    assert {"decision", "mask", "references", "error", "map_scale"} <= keys  # every kind of line was made
    assert sorted(k for k in keys if f"`{k}`" not in doc) == []
    for line in lines:  # the documented order
        at = [doc.index(f"`{k}`") for k in line]
        assert at == sorted(at), list(line)


def test_readme_mentions_the_flags_users_need():
    # flags the review found undocumented; each still exists in its command's parser
    import argparse

    from readme_check import README

    from moeclip.cli import build_parser

    text = README.read_text()
    wanted = {"train": ["--val", "--max-steps", "--epochs"],
              "predict": ["--threshold", "--pixel-threshold", "--no-maps", "--no-overlays"],
              "calibrate": ["--criterion", "--headroom", "--class"],
              "export onnx": ["--exporter", "--opset", "--no-check"]}
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, flags in wanted.items():
        p = subs[command.split()[0]]
        if " " in command:
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[command.split()[1]]
        known = {o for a in p._actions for o in a.option_strings}
        assert set(flags) <= known, command
        assert [f for f in flags if f"`{f}" not in text] == [], command
