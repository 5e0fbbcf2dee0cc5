"""Time and peak memory of one MoECLIP training step.

    python benchmarks/train_step.py [--clip-model ViT-L-14-336 --image-size 518 --batch-size 2
                                     --precision fp32|bf16 --device cpu|cuda --repeats 3 --warmup 1
                                     --grad-checkpoint | --compare-grad-checkpoint] [--released]
                                     --json OUT.json

One step = ``zero_grad`` + text features (frozen part cached, adapter re-applied) +
``model.compute_losses`` (forward, 12 focal+Dice map losses, CE, ETF and balance
losses) + ``backward`` + ``Adam.step``, as a training loop does it. ``--released``
uses the released-code configuration (no ETF/balance losses, no LoRA dropout).

Peak memory is the extra memory of the steps over what the model, inputs and text
cache hold before them (see ``common.py``: CUDA allocator peak, or peak RSS growth on
CPU, in a fresh process per variant). ``--compare-grad-checkpoint`` runs the step
without and with activation checkpointing of the vision blocks, each in its own
process, and reports both.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser, batch_size=2, repeats=3, warmup=1)
    parser.add_argument("--grad-checkpoint", action="store_true", help="checkpoint the vision blocks")
    parser.add_argument("--compare-grad-checkpoint", action="store_true",
                        help="run without and with --grad-checkpoint (separate processes) and compare")
    parser.add_argument("--released", action="store_true", help="released-code training (no ETF/balance loss)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--count-ops", action="store_true",
                        help="also count aten operations and autograd nodes per step (torch.profiler, 3 extra steps)")
    parser.add_argument("--timeout", type=float, default=1800, help="per-variant subprocess timeout (s)")
    return parser.parse_args(argv)


def run_single(args) -> dict:
    from moeclip.engine.train import _fused

    device = common.setup(args)
    print(f"building {args.clip_model} at {args.image_size} (random weights) on {device} ...", flush=True)
    model = common.build_moeclip(args.clip_model, args.image_size, device, args.seed, released=args.released)
    common.cast_frozen(model, args)
    model.train()
    model.grad_checkpoint = bool(args.grad_checkpoint)
    params = model.trainable_parameters()
    adam = _fused(params)  # the training loop's Adam options
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.999), **adam)
    model.text_features(common.DESCRIPTION)  # fills the frozen-text cache, as the first step of training would
    images, masks, labels = common.random_batch(args.batch_size, args.image_size, device, args.seed)
    phases = {"forward_loss": [], "backward_step": []}

    def step():
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with common.autocast(device, args.precision):
            text = model.text_features(common.DESCRIPTION)
            losses = model.compute_losses(images, masks, labels, text)
        common.sync(device)
        t1 = time.perf_counter()
        losses["total"].backward()
        opt.step()
        common.sync(device)
        phases["forward_loss"].append(t1 - t0)
        phases["backward_step"].append(time.perf_counter() - t1)
        return losses["total"].detach()

    cpu = {}
    with common.PeakMemory(device) as mem:
        times = common.bench({"step": step}, device, args.warmup, args.repeats, cpu_times=cpu)
    ops = common.count_ops(step) if args.count_ops else None
    n = args.warmup  # drop the warm-up entries of the phase split
    s = common.summary(times["step"])
    doc = {
        "benchmark": "train_step",
        "config": {**common.config_dict(args, device), "grad_checkpoint": bool(args.grad_checkpoint),
                   "released": bool(args.released), "optimizer": f"Adam(betas=(0.5, 0.999), {adam})"},
        "step_s": s["median"],
        "images_per_s": args.batch_size / s["median"],
        # process CPU time (all threads): on a shared machine it does not count waiting for a core
        "step_cpu_s": common.summary(cpu["step"])["median"],
        "ms_per_image_cpu": 1000 * common.summary(cpu["step"])["median"] / args.batch_size,
        "ops_per_step": ops,
        "forward_loss_s": common.summary(phases["forward_loss"][n:])["median"],
        "backward_step_s": common.summary(phases["backward_step"][n:])["median"],
        "peak_extra_mib": common.mib(mem.extra_bytes),
        "memory": mem.as_dict(),
        "trainable_parameters": sum(p.numel() for p in params),
        "times": s,
        "machine": common.machine_info(device),
    }
    if device.type == "cuda":
        doc["memory"]["peak_total_mib"] = common.mib(torch.cuda.max_memory_allocated(device))
    return doc


def main(argv=None) -> dict:
    args = parse(argv)
    if not args.compare_grad_checkpoint:
        doc = run_single(args)
        rows = [[f"grad_checkpoint={doc['config']['grad_checkpoint']}", doc["step_s"], doc["forward_loss_s"],
                 doc["backward_step_s"], doc["peak_extra_mib"]]]
    else:
        base = [os.path.abspath(__file__)] + _forward_args(argv if argv is not None else sys.argv[1:])
        off = common.run_json_subprocess(base, args.timeout)
        on = common.run_json_subprocess(base + ["--grad-checkpoint"], args.timeout)
        doc = {
            "benchmark": "train_step",
            "config": {k: v for k, v in off["config"].items() if k != "grad_checkpoint"},
            "without_grad_checkpoint": off,
            "with_grad_checkpoint": on,
            "step_s": off["step_s"],
            "step_s_grad_checkpoint": on["step_s"],
            "peak_extra_mib": off["peak_extra_mib"],
            "peak_extra_mib_grad_checkpoint": on["peak_extra_mib"],
            "grad_checkpoint_time_ratio": on["step_s"] / off["step_s"],
            "grad_checkpoint_memory_ratio": (on["peak_extra_mib"] / off["peak_extra_mib"]
                                             if off["peak_extra_mib"] else None),
            "machine": off["machine"],
        }
        rows = [[f"grad_checkpoint={d['config']['grad_checkpoint']}", d["step_s"], d["forward_loss_s"],
                 d["backward_step_s"], d["peak_extra_mib"]] for d in (off, on)]
    c = doc["config"]
    print()
    print(f"train step: {c['clip_model']} @ {c['image_size']}, batch {c['batch_size']}, {c['precision']}, "
          f"{c['device']}, released={c['released']} (median of {c['repeats']} after {c['warmup']} warm-up); "
          f"memory: {doc.get('memory', doc.get('without_grad_checkpoint', {}).get('memory', {})).get('method')}")
    common.print_table(rows, ["variant", "step s", "fwd+loss s", "bwd+Adam s", "peak extra MiB"])
    if doc.get("step_cpu_s") is not None:
        print(f"process CPU time per step (median): {doc['step_cpu_s']:.4f} s, {doc['ms_per_image_cpu']:.2f} ms/image")
    if doc.get("ops_per_step"):
        o = doc["ops_per_step"]
        print(f"per step: {o['aten_ops_top_level']:.0f} top-level aten ops ({o['aten_ops_all']:.0f} with nested), "
              f"{o['autograd_nodes']:.0f} autograd nodes")
    common.finish(doc, args.json)
    return doc


def _forward_args(argv):
    """The command line minus the options the parent handles itself."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--compare-grad-checkpoint", "--grad-checkpoint"):
            continue
        if a == "--json":
            skip = True
            continue
        if a.startswith("--json="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
