"""MoECLIP (this package) against the official implementation, on the same weights.

    python benchmarks/vs_official.py --reference-dir /path/to/official/checkout
        [--clip-model ViT-L-14-336 --image-size 518 --batch-size 1 --precision fp32
         --device cpu|cuda --repeats 3 --warmup 1 --tasks infer,train --modes paper,released
         --no-memory] --json OUT.json

The official code (github.com/CoCoRessa/MoECLIP, no licence) is imported from the
given checkout at run time and never copied: its hard-coded ``torch.device("cuda:0")``
in ``SimpleLoraExpert`` is redirected in memory to ``--device``, and two imports it
only needs for unrelated features are stubbed in memory when missing
(``transformers.activations.ACT2FN``, ``pkg_resources.packaging``). It also needs
``ipdb einops kornia opencv sklearn pandas scipy`` importable (benchmark-only
dependencies). Its vision loop is ``range(24)`` with width 1024, so only the ViT-L/14
tower can be compared (any ``--image-size`` multiple of 14).

Steps:
 1. Build the official CLIP (random weights, GELU, ``force_image_size``) and the official
    MoECLIP (FOFS, PAA, shared seg projections, no ReLU: ``train.py``'s defaults);
    randomise router gates and LoRA B (else every token ties and experts output 0).
 2. Build ours on the same weights: the CLIP state dict as is (same parameter names),
    the adapters through ``moeclip.model.checkpoint.official_to_ours``.
 3. Check in fp32, eval mode: text features, anomaly maps (relative 1e-3), image
    scores (1e-5); and one released-mode training loss and its gradients.
 4. Time, interleaved, after warm-up:
      inference  official: ``get_predictions``' body for one batch (forward, image
                 score, per-map ``calculate_similarity_map`` blur+upsample then sum, and
                 the second, unblurred map loop it also runs, both to NumPy):
                 "official" ; the same without the second loop: "official_core" ;
                 ours: ``model.predict`` + both outputs to NumPy.
                 "clip_floor": the plain CLIP tower (``encode_image``), which every
                 implementation contains: official / floor is the best speedup possible.
      training   official: ``train_adapter``'s step (adapted text embedding recomputed
                 through the text tower every step, forward, CE + per-map
                 ``calculate_seg_loss`` + aux/ETF terms, zero_grad, backward, Adam);
                 ours: cached text + ``compute_losses`` + backward + Adam.
                 mode "paper": both in train mode (LoRA dropout, ETF loss; the official
                 balance loss is 0 because of its misspelt coefficient, ours is computed);
                 mode "released": the official model in eval mode as ``train.py`` leaves
                 it, ours with ``released_training=True``.
                 "clip_floor": the frozen tower's forward and its backward down to the
                 first MoE layer (``common.clip_floor_step``), the least any exact
                 implementation computes; official / floor bounds the speedup.
                 bf16/fp16: ours casts the frozen CLIP weights once, as the package does
                 (``--no-cast-frozen`` to time plain autocast); the official code can only
                 use autocast (its inference cannot run in bf16 at all: ``.numpy()``).
 5. Peak memory of each timed variant in a fresh process (``common.PeakMemory``).

Targets (reported, not asserted): >= 1.5x inference, >= 2x training step, memory not
above the official.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import tempfile
import types
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TRAIN_MODES = ("paper", "released")
LR = 5e-5


# ---------------------------------------------------------------------------- the reference code
class _TorchProxy(types.ModuleType):
    """``torch`` for the reference's moe_adapter module, with ``torch.device("cuda:0")`` redirected."""

    def __init__(self, target: torch.device):
        super().__init__("torch")
        self._target = target

    def __getattr__(self, name):
        return getattr(torch, name)

    def device(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda") and not kwargs:
            return self._target
        return torch.device(*args, **kwargs)


def load_reference(reference_dir: str, device: torch.device) -> types.SimpleNamespace:
    reference_dir = os.path.abspath(reference_dir)
    if not os.path.isfile(os.path.join(reference_dir, "model", "moe_adapter.py")):
        raise SystemExit(f"{reference_dir}: not a checkout of the official MoECLIP (no model/moe_adapter.py)")
    try:  # only used to check an unrelated config field
        importlib.import_module("transformers.activations")
    except Exception:
        act = types.ModuleType("transformers.activations")
        act.ACT2FN = {"silu": torch.nn.SiLU, "gelu": torch.nn.GELU, "relu": torch.nn.ReLU}
        pkg = types.ModuleType("transformers")
        pkg.activations = act
        sys.modules["transformers"], sys.modules["transformers.activations"] = pkg, act
    try:  # the tokenizer imports packaging through pkg_resources (gone from recent setuptools)
        importlib.import_module("pkg_resources")
    except Exception:
        import packaging.version

        pr = types.ModuleType("pkg_resources")
        pr.packaging = packaging
        sys.modules["pkg_resources"] = pr
    sys.path.insert(0, reference_dir)
    ma = importlib.import_module("model.moe_adapter")
    mc = importlib.import_module("model.clip")
    fu = importlib.import_module("forward_utils")
    ma.torch = _TorchProxy(device)  # SimpleLoraExpert: torch.device("cuda:0") -> device
    return types.SimpleNamespace(ma=ma, create_model=mc.create_model, fu=fu)


def build_official(ref, image_size: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    clip = ref.create_model("ViT-L-14-336", img_size=image_size, pretrained=None,
                            force_image_size=image_size, device=device)
    clip.eval()
    model = ref.ma.MoECLIP(clip_model=clip, use_paa=True, seg_proj_sharing_strategy="shared",
                           image_adapt_weight=0.1, moe_r=8, use_fofs=True, moe_lora_alpha=16,
                           moe_num_experts=4, moe_top_k=2, moe_layers=[5, 11, 17, 23], relu=False).to(device)
    model.eval()
    for p in model.parameters():  # as train.py: CLIP frozen, adapters trainable except the FOFS A
        p.requires_grad = False
    for p in model.text_adapter.parameters():
        p.requires_grad = True
    for n, p in model.image_adapter.named_parameters():
        p.requires_grad = "lora_A" not in n
    return model


@torch.no_grad()
def randomize_official(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.image_adapter.named_parameters():
        if name.endswith("gate.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        elif name.endswith("lora_B.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def official_adapter_state(model) -> Dict[str, torch.Tensor]:
    state = {f"image_adapter.{k}": v for k, v in model.image_adapter.state_dict().items()}
    state.update({f"text_adapter.{k}": v for k, v in model.text_adapter.state_dict().items()})
    return state


def official_optimizer(model):
    image_params = [p for p in model.image_adapter.parameters() if p.requires_grad]
    return torch.optim.Adam([{"params": model.text_adapter.parameters()}, {"params": image_params}],
                            lr=LR, betas=(0.5, 0.999))


# ---------------------------------------------------------------------------- ours
def build_ours(clip_model: str, image_size: int, device: torch.device, clip_state, official_state,
               released: bool):
    from moeclip.model.checkpoint import official_to_ours
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    cfg = ModelConfig(backbone=BackboneConfig(model=clip_model, pretrained=None, image_size=image_size),
                      adapter=AdapterConfig(released_training=released))
    model = MoECLIP.from_config(cfg)
    model.clip.load_state_dict(clip_state, strict=True)
    model.load_adapter_state_dict(official_to_ours(official_state), "official model")
    return model.to(device).eval()


def ours_optimizer(model):
    return torch.optim.Adam(model.trainable_parameters(), lr=LR, betas=(0.5, 0.999))


# ---------------------------------------------------------------------------- the timed bodies
def official_text(ref, model, device):
    return ref.fu.get_adapted_single_class_text_embedding(model, None, common.DESCRIPTION, device)


def official_infer(ref, model, images, text, image_size, second_loop: bool):
    """``test.py:get_predictions`` for one batch (data handling and GT resizing left out)."""
    with torch.no_grad():
        patch_features, det_feature, _, _ = model(images)
        pred = det_feature @ text
        pred = (pred[:, 1] + 1) / 2
        score = pred.cpu().numpy()
        patch_preds = [ref.fu.calculate_similarity_map(f, text, image_size, test=True, domain="Industrial")
                       for f in patch_features]
        maps = torch.cat(patch_preds, dim=1).sum(1).cpu().numpy()
        if second_loop:
            anomaly_maps_b = []
            for f in patch_features:
                s = 100.0 * torch.matmul(f, text)
                B, L, C = s.shape
                H = int(np.sqrt(L))
                p = s.permute(0, 2, 1).view(B, C, H, H)
                p = (p[:, 1] + 1 - p[:, 0]) / 2
                anomaly_maps_b.append(F.interpolate(p.unsqueeze(1), size=image_size, mode="bilinear",
                                                    align_corners=True))
            torch.cat(anomaly_maps_b, dim=1).sum(1).cpu().numpy()
    return maps, score


def ours_infer(model, images, text):
    out = model.predict(images, text, "industrial")
    return out["anomaly_map"].float().cpu().numpy(), out["image_score"].float().cpu().numpy()


def official_loss(ref, model, images, masks, labels, image_size, device):
    """``train.py:train_adapter``'s loss for a batch of one class."""
    text = official_text(ref, model, device)
    epoch_text_feature = torch.stack([text for _ in range(images.shape[0])], dim=0)
    patch_features, det_feature, aux_loss, special_loss = model(images)
    loss = 0.0
    cls_preds = torch.matmul(det_feature.unsqueeze(1), epoch_text_feature)[:, 0]
    loss += F.cross_entropy(cls_preds, labels)
    for f in patch_features:
        patch_preds = ref.fu.calculate_similarity_map(f, epoch_text_feature, image_size)
        loss += ref.fu.calculate_seg_loss(patch_preds, masks)
    loss += aux_loss * 0.01
    loss += special_loss * 0.01
    return loss


def make_official_step(ref, model, opt, images, masks, labels, image_size, device, mode, precision):
    def step():
        model.train(mode == "paper")
        model.clipmodel.eval()  # CLIP stays in eval mode (its default patch_dropout=0.2 would drop patches)
        with common.autocast(device, precision):
            loss = official_loss(ref, model, images, masks, labels, image_size, device)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def make_ours_step(model, opt, images, masks, labels, device, precision):
    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        with common.autocast(device, precision):
            text = model.text_features(common.DESCRIPTION)
            loss = model.compute_losses(images, masks, labels, text)["total"]
        loss.backward()
        opt.step()
        return loss.detach()
    return step


# ---------------------------------------------------------------------------- checks
def check_agreement(ref, off, ours, images, masks, labels, args, device) -> Dict[str, Any]:
    from moeclip.model.checkpoint import ours_to_official

    res: Dict[str, Any] = {}
    off.eval(), ours.eval()
    with torch.no_grad():
        t_off = official_text(ref, off, device)
    t_ours = ours.text_features(common.DESCRIPTION).detach()
    res["text_max_abs_diff"] = float((t_off - t_ours).abs().max())
    m_off, s_off = official_infer(ref, off, images, t_off, args.image_size, second_loop=False)
    m_ours, s_ours = ours_infer(ours, images, t_ours)
    scale = float(np.abs(m_off).max())
    res["map_max_abs_diff"] = float(np.abs(m_off - m_ours).max())
    res["map_rel_diff"] = res["map_max_abs_diff"] / scale
    res["score_max_abs_diff"] = float(np.abs(s_off - s_ours).max())
    res["maps_ok"] = res["map_rel_diff"] <= 1e-3
    res["scores_ok"] = res["score_max_abs_diff"] <= 1e-5

    if args.check_train:  # released mode: deterministic on both sides
        off.eval()
        for p in off.parameters():
            p.grad = None
        l_off = official_loss(ref, off, images, masks, labels, args.image_size, device)
        l_off.backward()
        ours_rel = args._ours_released
        ours_rel.train()
        ours_rel.zero_grad(set_to_none=True)
        l_ours = ours_rel.compute_losses(images, masks, labels, ours_rel.text_features(common.DESCRIPTION))["total"]
        l_ours.backward()
        l_off_v, l_ours_v = float(l_off.detach()), float(l_ours.detach())
        res["loss_official"], res["loss_ours"] = l_off_v, l_ours_v
        res["loss_rel_diff"] = abs(l_off_v - l_ours_v) / abs(l_off_v)
        off_params = dict(off.named_parameters())
        grads = {k: p.grad for k, p in ours_rel.named_parameters() if p.requires_grad and not k.startswith("clip.")}
        mapped = ours_to_official({k: g for k, g in grads.items() if g is not None})
        worst = 0.0
        for k, g in mapped.items():
            go = off_params[k].grad
            if go is None:
                continue
            worst = max(worst, float((g - go).abs().max() / (go.abs().max() + 1e-12)))
        res["grad_max_rel_diff"] = worst
        for p in off.parameters():
            p.grad = None
        ours_rel.zero_grad(set_to_none=True)
        off.eval()
    return res


# ---------------------------------------------------------------------------- memory workers
def worker(args) -> Dict[str, Any]:
    """One variant in a fresh process: build, load the shared weights, time and measure memory."""
    device = common.setup(args)
    side, task = args._worker.split(":", 1)
    blob = torch.load(args._weights, map_location="cpu", weights_only=True, mmap=True)
    images, masks, labels = common.random_batch(args.batch_size, args.image_size, device, args.seed)
    ref = load_reference(args.reference_dir, device) if side == "official" else None
    if side == "official":
        model = build_official(ref, args.image_size, device, args.seed)
        model.clipmodel.load_state_dict(blob["clip"], strict=True)
        model.image_adapter.load_state_dict({k[len("image_adapter."):]: v for k, v in blob["adapters"].items()
                                             if k.startswith("image_adapter.")})
        model.text_adapter.load_state_dict({k[len("text_adapter."):]: v for k, v in blob["adapters"].items()
                                            if k.startswith("text_adapter.")})
    else:
        model = build_ours(args.clip_model, args.image_size, device, blob["clip"], blob["adapters"],
                           released=(task == "train-released"))
        common.cast_frozen(model, args)
    del blob
    gc.collect()
    if task == "infer":
        if side == "official":
            with torch.no_grad():
                text = official_text(ref, model, device)
            fn = lambda: official_infer(ref, model, images, text, args.image_size, second_loop=True)  # noqa: E731
        else:
            text = model.text_features(common.DESCRIPTION).detach()
            fn = lambda: ours_infer(model, images, text)  # noqa: E731
        def body():
            with common.autocast(device, args.precision):
                return fn()
    else:
        mode = task.split("-", 1)[1]
        if side == "official":
            body = make_official_step(ref, model, official_optimizer(model), images, masks, labels,
                                      args.image_size, device, mode, args.precision)
        else:
            model.text_features(common.DESCRIPTION)
            body = make_ours_step(model, ours_optimizer(model), images, masks, labels, device, args.precision)
    gc.collect()
    cpu = {}
    with common.PeakMemory(device) as mem:
        times = common.bench({args._worker: body}, device, 0, args.memory_repeats, log=False, cpu_times=cpu)
    return {"variant": args._worker, "memory": mem.as_dict(), "peak_extra_mib": common.mib(mem.extra_bytes),
            "times": common.summary(times[args._worker]), "cpu_times": common.summary(cpu[args._worker])}


def run_worker_subprocess(args, variant: str, weights: str) -> Dict[str, Any]:
    argv = [os.path.abspath(__file__), "--reference-dir", args.reference_dir, "--clip-model", args.clip_model,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--device", args.device, "--seed", str(args.seed),
            "--threads", str(args.threads), "--memory-repeats", str(args.memory_repeats),
            "--_worker", variant, "--_weights", weights] + ([] if args.cast_frozen else ["--no-cast-frozen"])
    try:
        return common.run_json_subprocess(argv, args.timeout)
    except Exception as exc:  # report, do not lose the timings
        return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------- main
def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, repeats=3, warmup=1)
    parser.add_argument("--reference-dir", required=True, help="checkout of the official MoECLIP code")
    parser.add_argument("--tasks", default="infer,train", help="comma list of infer, train")
    parser.add_argument("--modes", default="paper,released", help="training modes: comma list of paper, released")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--memory-repeats", type=int, default=2, help="runs inside each memory process")
    parser.add_argument("--no-check-train", dest="check_train", action="store_false",
                        help="skip the loss/gradient agreement check")
    parser.add_argument("--timeout", type=float, default=1800, help="per memory-process timeout (s)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clip_model not in ("ViT-L-14-336", "ViT-L-14"):
        parser.error("the official code hard-codes a 24-block, width-1024 tower: use ViT-L-14-336 or ViT-L-14")
    if args.image_size % 14:
        parser.error("--image-size must be a multiple of the patch size 14")
    return args


def time_inference(args, ref, off, ours, images, device) -> Tuple[Dict[str, Any], List[list]]:
    """Interleaved inference timings: official, official core, ours, the plain-CLIP floor."""
    rows: List[list] = []
    print("timing inference ...", flush=True)
    with torch.no_grad():
        t_off = official_text(ref, off, device)
    t_ours = ours.text_features(common.DESCRIPTION).detach()
    off.eval(), ours.eval()

    def wrap(fn):
        def run():
            with common.autocast(device, args.precision):
                return fn()
        return run

    fns = {
        "official": wrap(lambda: official_infer(ref, off, images, t_off, args.image_size, True)),
        "official_core": wrap(lambda: official_infer(ref, off, images, t_off, args.image_size, False)),
        "ours": wrap(lambda: ours_infer(ours, images, t_ours)),
        "clip_floor": common.clip_floor_infer(ours, images, device, args.precision),
    }
    try:
        cpu = {}
        times = common.bench(fns, device, args.warmup, args.repeats, cpu_times=cpu)
        s = {k: common.summary(v) for k, v in times.items()}
        sc = {k: common.summary(v) for k, v in cpu.items()}
        inf = {"times": s, "cpu_times": sc, "official_s": s["official"]["median"],
               "official_core_s": s["official_core"]["median"], "ours_s": s["ours"]["median"]}
        inf["speedup"] = inf["official_s"] / inf["ours_s"]
        inf["speedup_vs_core"] = inf["official_core_s"] / inf["ours_s"]
        inf["speedup_min"] = s["official"]["min"] / s["ours"]["min"]
        inf["speedup_cpu_time"] = sc["official"]["median"] / sc["ours"]["median"]
        inf["speedup_vs_core_cpu_time"] = sc["official_core"]["median"] / sc["ours"]["median"]
        inf["clip_floor_s"] = s["clip_floor"]["median"]
        inf["ceiling_speedup"] = inf["official_s"] / inf["clip_floor_s"]  # if ours cost no more than CLIP
        inf["ceiling_speedup_cpu_time"] = sc["official"]["median"] / sc["clip_floor"]["median"]
        rows += [["inference", "official (get_predictions)", inf["official_s"], ""],
                 ["inference", "official core (one map loop)", inf["official_core_s"], ""],
                 ["inference", "ours (predict)", inf["ours_s"],
                  f"x{inf['speedup']:.2f} (x{inf['speedup_vs_core']:.2f} vs core); CPU time "
                  f"x{inf['speedup_cpu_time']:.2f} (x{inf['speedup_vs_core_cpu_time']:.2f})"],
                 ["inference", "plain CLIP encode_image (floor)", inf["clip_floor_s"],
                  f"ceiling x{inf['ceiling_speedup']:.2f} (CPU time x{inf['ceiling_speedup_cpu_time']:.2f})"]]
    except Exception as exc:
        inf = {"error": f"{type(exc).__name__}: {exc}"}
        print("inference timing failed:", inf["error"])
    return inf, rows


def time_training(args, ref, off, ours, images, masks, labels, device, modes) -> Tuple[Dict[str, Any], List[list]]:
    """Interleaved training-step timings per mode: official, ours, the official text pass, the floor."""
    rows: List[list] = []
    training: Dict[str, Any] = {}
    for mode in modes:
        print(f"timing training step, mode {mode} ...", flush=True)
        o_model = ours if mode == "paper" else args._ours_released
        fns = {
            "official": make_official_step(ref, off, official_optimizer(off), images, masks, labels,
                                           args.image_size, device, mode, args.precision),
            "ours": make_ours_step(o_model, ours_optimizer(o_model), images, masks, labels, device,
                                   args.precision),
        }
        # the official text tower pass alone: a part of its step that ours caches (interleaved too)
        def text_pass():
            with common.autocast(device, args.precision):
                return official_text(ref, off, device)
        fns["official_text_pass"] = text_pass
        fns["clip_floor"] = common.clip_floor_step(o_model, images, device, args.precision)
        try:
            cpu = {}
            times = common.bench(fns, device, args.warmup, args.repeats, cpu_times=cpu)
            s = {k: common.summary(v) for k, v in times.items()}
            sc = {k: common.summary(v) for k, v in cpu.items()}
            tr = {"times": s, "cpu_times": sc, "official_s": s["official"]["median"], "ours_s": s["ours"]["median"],
                  "official_text_encoding_s": s["official_text_pass"]["median"]}
            tr["speedup"] = tr["official_s"] / tr["ours_s"]
            tr["speedup_min"] = s["official"]["min"] / s["ours"]["min"]
            tr["speedup_cpu_time"] = sc["official"]["median"] / sc["ours"]["median"]
            tr["speedup_without_official_text"] = (tr["official_s"] - tr["official_text_encoding_s"]) / tr["ours_s"]
            tr["speedup_without_official_text_cpu_time"] = \
                (sc["official"]["median"] - sc["official_text_pass"]["median"]) / sc["ours"]["median"]
            tr["clip_floor_s"] = s["clip_floor"]["median"]
            tr["ceiling_speedup"] = tr["official_s"] / tr["clip_floor_s"]
            tr["ceiling_speedup_cpu_time"] = sc["official"]["median"] / sc["clip_floor"]["median"]
            rows += [[f"train ({mode})", "official (train_adapter step)", tr["official_s"],
                      f"of which text tower {tr['official_text_encoding_s']:.3g} s"],
                     [f"train ({mode})", "ours", tr["ours_s"],
                      f"x{tr['speedup']:.2f} (x{tr['speedup_without_official_text']:.2f} without their text pass); "
                      f"CPU time x{tr['speedup_cpu_time']:.2f} "
                      f"(x{tr['speedup_without_official_text_cpu_time']:.2f})"],
                     [f"train ({mode})", "frozen-tower floor (fwd + bwd to 1st MoE)", tr["clip_floor_s"],
                      f"ceiling x{tr['ceiling_speedup']:.2f} (CPU time x{tr['ceiling_speedup_cpu_time']:.2f})"]]
        except Exception as exc:
            tr = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"training timing ({mode}) failed:", tr["error"])
        training[mode] = tr
    return training, rows


def measure_memory(args, tasks, modes, weights: str) -> Tuple[Dict[str, Any], List[list], Dict[str, float]]:
    """Peak memory of each timed variant, each in a fresh process loading ``weights``."""
    variants = (["official:infer", "ours:infer"] if "infer" in tasks else []) + \
               [f"{side}:train-{m}" for m in (modes if "train" in tasks else []) for side in ("official", "ours")]
    mem = {v: run_worker_subprocess(args, v, weights) for v in variants}
    rows = [["memory", v, r.get("peak_extra_mib", r.get("error")), "MiB peak extra"] for v, r in mem.items()]
    ratios: Dict[str, float] = {}
    for task_key in ["infer"] + [f"train-{m}" for m in modes]:
        a, b = mem.get(f"official:{task_key}", {}), mem.get(f"ours:{task_key}", {})
        if "peak_extra_mib" in a and "peak_extra_mib" in b and b["peak_extra_mib"]:
            ratios[task_key] = a["peak_extra_mib"] / b["peak_extra_mib"]
    return mem, rows, ratios


def print_summary(args, device, check: Dict[str, Any], rows: List[list]) -> None:
    print()
    print(f"vs official: {args.clip_model} @ {args.image_size}, batch {args.batch_size}, {args.precision}, {device} "
          f"(median of {args.repeats} after {args.warmup} warm-up)")
    print(f"agreement: map rel diff {check['map_rel_diff']:.2e} (ok={check['maps_ok']}), "
          f"score diff {check['score_max_abs_diff']:.2e} (ok={check['scores_ok']})"
          + (f", loss rel diff {check['loss_rel_diff']:.2e}, grad rel diff {check['grad_max_rel_diff']:.2e}"
             if "loss_rel_diff" in check else ""))
    common.print_table(rows, ["task", "variant", "s (or MiB)", "note"])


def main(argv=None) -> Dict[str, Any]:
    args = parse(argv)
    if args._worker:
        doc = worker(args)
        common.finish(doc, args.json)
        return doc
    device = common.setup(args)
    tasks = [t for t in args.tasks.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    ref = load_reference(args.reference_dir, device)
    print(f"building the official model and ours ({args.clip_model} @ {args.image_size}, random weights) ...",
          flush=True)
    off = build_official(ref, args.image_size, device, args.seed)
    randomize_official(off, args.seed)
    clip_state = {k: v.detach().clone() for k, v in off.clipmodel.state_dict().items()}
    adapters = {k: v.detach().clone() for k, v in official_adapter_state(off).items()}
    ours = build_ours(args.clip_model, args.image_size, device, clip_state, adapters, released=False)
    args._ours_released = build_ours(args.clip_model, args.image_size, device, clip_state, adapters, released=True) \
        if (args.check_train or "released" in modes) else None
    images, masks, labels = common.random_batch(args.batch_size, args.image_size, device, args.seed)

    print("checking agreement (fp32, eval) ...", flush=True)
    check = check_agreement(ref, off, ours, images, masks, labels, args, device)
    for k, v in check.items():
        print(f"  {k}: {v}")
    for m in (ours, args._ours_released):  # after the fp32 check: what the package does for bf16/fp16
        if m is not None:
            common.cast_frozen(m, args)

    doc: Dict[str, Any] = {"benchmark": "vs_official", "config": {**common.config_dict(args, device),
                                                                  "tasks": tasks, "modes": modes},
                           "check": check, "machine": common.machine_info(device)}
    rows = []
    if "infer" in tasks:
        doc["inference"], inf_rows = time_inference(args, ref, off, ours, images, device)
        rows += inf_rows
    if "train" in tasks:
        doc["training"], train_rows = time_training(args, ref, off, ours, images, masks, labels, device, modes)
        rows += train_rows
    del args._ours_released

    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            weights = os.path.join(tmp, "weights.pt")
            torch.save({"clip": clip_state, "adapters": adapters}, weights)
            del off, ours, clip_state, adapters  # the workers measure from a clean process
            gc.collect()
            doc["memory"], mem_rows, ratios = measure_memory(args, tasks, modes, weights)
        rows += mem_rows
        if ratios:
            doc["memory_ratio"] = ratios

    print_summary(args, device, check, rows)
    common.finish(doc, args.json)
    return doc


if __name__ == "__main__":
    main()
