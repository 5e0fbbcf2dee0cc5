"""Inference overhead of MoECLIP over the plain CLIP image encoder, at the same resolution and precision.

    python benchmarks/overhead.py [--clip-model ViT-L-14-336 --image-size 518 --batch-size 1
                                   --precision fp32|bf16 --device cpu|cuda --repeats 5 --warmup 1
                                   --json OUT.json]

Times, interleaved (CLIP, MoECLIP, post-processing, CLIP, ...), after warm-up, with
``torch.inference_mode()`` and autocast for bf16/fp16:

  clip       ``clip.encode_image(images)`` (the frozen tower + ln_post + proj on CLS)
  moeclip    ``model.predict(images, text, "industrial")``: the tower with the 4 MoE
             adapters, PAA, the 12 seg maps, the detection head, the anomaly map at the
             input resolution and the image score (text features cached beforehand, as
             at test time)
  postproc   ``moeclip.model.scoring.anomaly_map`` alone on the features ``predict`` produced
             (12 patch-text products, sum, one 7x7 blur, bilinear upsample)

and reports medians, ``ratio = moeclip / clip``, the extra milliseconds per image and
the share of the post-processing in the MoECLIP time. Random weights (pretrained=None):
speed does not depend on the weight values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser)
    parser.add_argument("--compare-cast", action="store_true",
                        help="bf16/fp16: also time a second copy left to plain autocast (frozen weights "
                             "re-cast every forward), interleaved, and report what casting once saves")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count aten operations per MoECLIP predict call (torch.profiler)")
    args = parser.parse_args(argv)
    device = common.setup(args)

    from moeclip.model.scoring import anomaly_map

    print(f"building {args.clip_model} at {args.image_size} (random weights) on {device} ...", flush=True)
    model = common.build_moeclip(args.clip_model, args.image_size, device, args.seed)
    common.cast_frozen(model, args)
    text = model.text_features(common.DESCRIPTION).detach()
    images, _, _ = common.random_batch(args.batch_size, args.image_size, device, args.seed)
    size = (args.image_size, args.image_size)

    with common.autocast(device, args.precision), torch.inference_mode():
        vision = model.predict(images, text, "industrial")["vision"]
    seg, grid = vision.seg_features, vision.grid
    text_cast = text.to(vision.det_feature.dtype)

    run_clip = common.clip_floor_infer(model, images, device, args.precision)

    def run_moeclip():
        with common.autocast(device, args.precision):
            return model.predict(images, text, "industrial")

    def run_postproc():
        with common.autocast(device, args.precision), torch.inference_mode():
            return anomaly_map(seg, text_cast, grid, size, "industrial")

    fns = {"clip": run_clip, "moeclip": run_moeclip, "postproc": run_postproc}
    compare = args.compare_cast and args.precision != "fp32" and args.cast_frozen
    if compare:  # the same weights (same seed), left to plain autocast
        plain = common.build_moeclip(args.clip_model, args.image_size, device, args.seed)

        def run_plain():
            with common.autocast(device, args.precision):
                return plain.predict(images, text, "industrial")

        with common.autocast(device, args.precision):
            same = torch.equal(plain.predict(images, text, "industrial")["anomaly_map"],
                               model.predict(images, text, "industrial")["anomaly_map"])
        fns.update(clip_autocast_only=common.clip_floor_infer(plain, images, device, args.precision),
                   moeclip_autocast_only=run_plain)
    cpu = {}
    times = common.bench(fns, device, args.warmup, args.repeats, cpu_times=cpu)
    ops = common.count_ops(run_moeclip) if args.count_ops else None
    s = {k: common.summary(v) for k, v in times.items()}
    sc = {k: common.summary(v) for k, v in cpu.items()}
    clip_s, moe_s, post_s = s["clip"]["median"], s["moeclip"]["median"], s["postproc"]["median"]
    B = args.batch_size
    doc = {
        "benchmark": "overhead",
        "config": common.config_dict(args, device),
        "clip_s": clip_s,
        "moeclip_s": moe_s,
        "ratio": moe_s / clip_s,
        # robust to load that comes and goes on a shared machine: best-of and per-round pairs
        "ratio_min": s["moeclip"]["min"] / s["clip"]["min"],
        "ratio_paired_median": statistics.median(m / c for m, c in zip(times["moeclip"], times["clip"])),
        # process CPU time (all threads): insensitive to waiting for a core on a shared CPU
        "ratio_cpu_time": sc["moeclip"]["median"] / sc["clip"]["median"] if device.type == "cpu" else None,
        "postproc_share_cpu_time": sc["postproc"]["median"] / sc["moeclip"]["median"] if device.type == "cpu" else None,
        "postproc_s": post_s,
        "postproc_share": post_s / moe_s,
        "extra_ms_per_image": (moe_s - clip_s) / B * 1000,
        "clip_images_per_s": B / clip_s,
        "moeclip_images_per_s": B / moe_s,
        "times": s,
        "cpu_times": sc,
        "machine": common.machine_info(device),
        "moeclip_ms_per_image_cpu": 1000 * sc["moeclip"]["median"] / B if device.type == "cpu" else None,
        "ops_per_predict": ops,
    }
    if compare:
        doc["cast_compare"] = {
            "maps_bit_identical": same,
            "clip_autocast_only_s": s["clip_autocast_only"]["median"],
            "moeclip_autocast_only_s": s["moeclip_autocast_only"]["median"],
            "moeclip_speedup_from_cast": s["moeclip_autocast_only"]["median"] / moe_s,
            "clip_speedup_from_cast": s["clip_autocast_only"]["median"] / clip_s,
        }
    print()
    print(f"{args.clip_model} @ {args.image_size}, batch {B}, {args.precision}, {device} "
          f"(median of {args.repeats} after {args.warmup} warm-up)")
    common.print_table([
        ["CLIP encode_image", clip_s, B / clip_s, ""],
        ["MoECLIP predict", moe_s, B / moe_s,
         f"x{moe_s / clip_s:.3f} (+{doc['extra_ms_per_image']:.1f} ms/img; "
         f"best-of x{doc['ratio_min']:.3f}, paired x{doc['ratio_paired_median']:.3f})"],
        ["  of which anomaly_map", post_s, "", f"{100 * post_s / moe_s:.2f}% of MoECLIP"],
    ] + ([
        ["CLIP, plain autocast", s["clip_autocast_only"]["median"], "",
         f"casting frozen weights once: x{doc['cast_compare']['clip_speedup_from_cast']:.3f}"],
        ["MoECLIP, plain autocast", s["moeclip_autocast_only"]["median"], "",
         f"casting frozen weights once: x{doc['cast_compare']['moeclip_speedup_from_cast']:.3f} "
         f"(maps bit-identical: {same})"],
    ] if compare else []), ["what", "s/batch", "img/s", "note"])
    if device.type == "cpu":
        print(f"process CPU time (median): CLIP {sc['clip']['median']:.3f} s, MoECLIP {sc['moeclip']['median']:.3f} s, "
              f"ratio x{doc['ratio_cpu_time']:.3f}, anomaly_map {100 * doc['postproc_share_cpu_time']:.2f}%")
    if ops:
        print(f"MoECLIP predict: {ops['aten_ops_top_level']:.0f} top-level aten ops per call "
              f"({ops['aten_ops_all']:.0f} with nested)")
    common.finish(doc, args.json)
    return doc


if __name__ == "__main__":
    main()
