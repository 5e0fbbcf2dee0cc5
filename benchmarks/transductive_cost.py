"""Transductive (MuSc) cost per image: the tower pass, mutual scoring for batch size N and M compared images.

What MuSc costs beyond one forward pass is mutual scoring (MSM): each image's patches are compared
with the patches of K = N - 1 other images (K = M with ``--mutual-images M``) at every level and
LNAMD degree, i.e. ``2 K L^2 C x levels x degrees`` FLOPs per image (L patches of width C). This
script measures, on random weights and random tokens of the real shapes (the cost does not depend
on the values):

* ``tower``: the frozen tower's forward per image (``MuSc.tokens``, batch ``--batch-size``);
* ``musc``: ``MuSc.from_tokens`` (LNAMD, MSM, upsampling, RsCIN) on an N-image batch, per image
  (wall time, and process CPU time, which a machine shared with other jobs inflates less),
  and the extra peak memory of that call (CPU: RSS growth; CUDA: allocator peak) with the default
  distance blocks (``--chunk-mb``), plus the memory the batch's tokens take (they grow with N);
* a GPU estimate from the FLOPs at ``--gpu-tflops`` sustained (an assumption, printed as such).

    python benchmarks/transductive_cost.py --clip-model ViT-B-16 --image-size 224 --n 8,32,64 --m none,16 --threads 1
    python benchmarks/transductive_cost.py --clip-model ViT-L-14-336 --image-size 518 --n 8 --m none --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def tower_flops(tokens: int, width: int, depth: int, patch: int) -> float:
    """Forward FLOPs of a ViT per image: 24 L C^2 (qkv, proj, 4x MLP) + 4 L^2 C (attention) per block."""
    blocks = depth * (24.0 * tokens * width ** 2 + 4.0 * tokens ** 2 * width)
    return blocks + 2.0 * (tokens - 1) * 3 * patch ** 2 * width


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--levels", default=None, help="1-based block outputs (default: quarter points)")
    p.add_argument("--n", default="8,32,64", help="batch sizes N")
    p.add_argument("--m", default="none,16", help="compared images M per image ('none': all N-1)")
    p.add_argument("--batch-size", type=int, default=8, help="forward-pass batch of the tower timing")
    p.add_argument("--chunk-mb", type=int, default=256, help="distance block size (MuSc's chunk_mb)")
    p.add_argument("--gpu-tflops", type=float, default=40.0,
                   help="sustained fp32 TFLOP/s assumed for the GPU estimate (default 40: ~60%% of an H100's 67)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = common.setup(args)
    info = common.machine_info(device)
    from moeclip.model.backbone import create_vision_clip
    from moeclip.model.config import BackboneConfig
    from moeclip.model.musc import MuSc, flops_per_image

    clip = create_vision_clip(BackboneConfig(args.clip_model, None, args.image_size))
    levels = [int(v) for v in args.levels.split(",")] if args.levels else None
    scorer = MuSc(clip, image_size=args.image_size, levels=levels, device=str(device), chunk_mb=args.chunk_mb,
                  batch_size=args.batch_size)
    visual = clip.visual
    width, depth = visual.conv1.out_channels, len(visual.transformer.resblocks)
    L = scorer.grid[0] * scorer.grid[1]
    embed = int(visual.proj.shape[1])
    nlev, nrad = len(scorer.levels), len(scorer.radii)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    scorer.tokens(images[:1])  # warm-up
    common.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    scorer.tokens(images)
    common.sync(device)
    tower_s = (time.perf_counter() - t0) / args.batch_size
    tower_cpu = (time.process_time() - c0) / args.batch_size
    tflop_tower = tower_flops(L + 1, width, depth, int(visual.conv1.kernel_size[0])) / 1e12

    ns = [int(v) for v in args.n.split(",")]
    ms = [None if v.strip().lower() == "none" else int(v) for v in args.m.split(",")]
    rows, results = [], []
    gen = torch.Generator().manual_seed(args.seed)
    for n in ns:
        toks = [torch.randn(n, L, width, generator=gen).to(device) for _ in scorer.levels]
        cls = torch.nn.functional.normalize(torch.randn(n, embed, generator=gen), dim=-1)
        token_mib = n * nlev * L * width * 4 / 2**20
        for m in ms:
            if m is not None and m >= n - 1:
                continue
            scorer.mutual_images = m
            with common.PeakMemory(device) as mem:
                common.sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                scorer.from_tokens(toks, cls)
                common.sync(device)
                musc_s = (time.perf_counter() - t0) / n
                musc_cpu = (time.process_time() - c0) / n
            k = n - 1 if m is None else m
            tflop = flops_per_image(n, m, L, width, nlev, nrad) / 1e12
            gpu_s = (tflop + tflop_tower) / args.gpu_tflops
            res = {"n": n, "m": m, "compared": k, "tower_s_per_image": tower_s, "musc_s_per_image": musc_s,
                   "tower_cpu_s_per_image": tower_cpu, "musc_cpu_s_per_image": musc_cpu,
                   "total_s_per_image": tower_s + musc_s, "msm_tflop_per_image": tflop,
                   "tower_tflop_per_image": tflop_tower, "measured_msm_gflops": tflop * 1e3 / musc_cpu,
                   "gpu_estimate_s_per_image": gpu_s, "tokens_mib": round(token_mib, 1),
                   "musc_extra_peak_mib": common.mib(mem.extra_bytes), "memory_method": mem.method}
            results.append(res)
            rows.append([n, "all" if m is None else m, k, tower_s, musc_s, tower_s + musc_s, tower_cpu + musc_cpu,
                         tflop, res["measured_msm_gflops"], gpu_s * 1e3, token_mib, res["musc_extra_peak_mib"]])
            print(f"N={n} M={m}: {musc_s:.3f} s/image scoring", file=sys.stderr, flush=True)
        del toks
    print(f"{args.clip_model} @ {args.image_size}: {L} patches x {width}, levels {scorer.levels}, r {scorer.radii}; "
          f"{info['cpu']} ({info['torch_threads']} threads){', ' + info['gpu'] if 'gpu' in info else ''}")
    common.print_table(rows, ["N", "M", "K", "tower s/img", "musc s/img", "total s/img", "total CPU s/img",
                              "MSM TFLOP/img", "MSM GFLOP/s (CPU time)", f"GPU est ms/img @{args.gpu_tflops:g}TF",
                              "tokens MiB",
                              "musc peak +MiB"])
    common.finish({"config": {**vars(args), "levels": scorer.levels, "patches": L, "width": width},
                   "machine": info, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
