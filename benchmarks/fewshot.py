"""Few-shot cost: the memory-bank search added to the zero-shot forward, and the bank's memory (issue 12).

Variants, timed interleaved in one run (``common.bench``):

* ``zero_shot``: ``MoECLIP.predict`` (tower + MoE + seg head + anomaly map + image score), as a
  zero-shot ``Detector`` runs it;
* ``search_K``: what few-shot adds for K references: the exact nearest-neighbour search of the
  12 seg feature maps against the 12 banks (chunked matrix products) and the few-shot map's
  blur and upsampling (``MemoryBank.anomaly_map`` on the features of the same images);
* ``few_shot_K`` (``--full``): the whole few-shot forward, ``fewshot.predict_with_bank``.

The ratio reported is ``search_K / zero_shot`` (and ``few_shot_K / zero_shot - 1`` with ``--full``).
Bank contents are random unit vectors of the real shape (K x patches per map, per map): the search
costs the same whatever the values, and building a real K = 16 bank of ViT-L at 518 px would
take 16 forwards. Bank memory is the stored size, fp32 and fp16.

    python benchmarks/fewshot.py --clip-model ViT-B-16 --image-size 224 --threads 1 --json out.json
    python benchmarks/fewshot.py --clip-model ViT-L-14-336 --image-size 518 --threads 1 --repeats 2 --json out.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def random_bank(model, shots: int, grid, dim: int, dtype: torch.dtype, device, seed: int):
    from moeclip.model.fewshot import MemoryBank, model_fingerprint

    g = torch.Generator().manual_seed(seed)
    n = shots * grid[0] * grid[1]
    feats = [F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device=device, dtype=dtype)
             for _ in range(model.adapter_config.num_maps)]
    return MemoryBank(feats, "object", shots, model.config.backbone.image_size, tuple(grid),
                      model_fingerprint(model))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p, batch_size=1, image_size=common.DEFAULT_SIZE, repeats=3, warmup=1)
    p.add_argument("--shots", default="1,4,16", help="comma-separated K values")
    p.add_argument("--bank-fp16", action="store_true", help="store the banks in fp16 (the search stays fp32)")
    p.add_argument("--full", action="store_true", help="also time the whole few-shot forward per K")
    args = p.parse_args(argv)
    device = common.setup(args)
    from moeclip.model.fewshot import predict_with_bank

    shots = [int(k) for k in args.shots.split(",") if k.strip()]
    model = common.build_moeclip(args.clip_model, args.image_size, device, args.seed)
    common.cast_frozen(model, args)
    images, _, _ = common.random_batch(args.batch_size, args.image_size, device, args.seed)
    with torch.inference_mode():
        text = model.text_features(common.DESCRIPTION).to(device)
        with common.autocast(device, args.precision):
            out = model.encode_image(images, compute_losses=False)
    feats, grid = [f.float() for f in out.seg_features], tuple(out.grid)
    dim = feats[0].shape[-1]
    bank_dtype = torch.float16 if args.bank_fp16 else torch.float32
    banks = {k: random_bank(model, k, grid, dim, bank_dtype, device, args.seed + k) for k in shots}
    size = (args.image_size, args.image_size)

    def zero_shot():
        with common.autocast(device, args.precision), torch.inference_mode():
            return model.predict(images, text, "industrial")

    def search(bank):
        def run():
            with torch.inference_mode():
                return bank.anomaly_map(feats, grid, size, "industrial")
        return run

    def few_shot(bank):
        def run():
            with common.autocast(device, args.precision):
                return predict_with_bank(model, images, text, bank, "industrial")
        return run

    fns = {"zero_shot": zero_shot}
    for k in shots:
        fns[f"search_{k}"] = search(banks[k])
        if args.full:
            fns[f"few_shot_{k}"] = few_shot(banks[k])
    cpu = {}
    times = common.bench(fns, device, args.warmup, args.repeats, cpu_times=cpu)
    med = {n: statistics.median(t) for n, t in times.items()}
    cmed = {n: statistics.median(t) for n, t in cpu.items()}
    rows, results = [], {}
    for k in shots:
        entries = banks[k].features[0].shape[0]
        r = {"entries_per_map": entries,
             "bank_mib_fp32": common.mib(12 * entries * dim * 4), "bank_mib_fp16": common.mib(12 * entries * dim * 2),
             "search_s": med[f"search_{k}"], "zero_shot_s": med["zero_shot"],
             "added_ratio": med[f"search_{k}"] / med["zero_shot"],
             "added_ratio_cpu": cmed[f"search_{k}"] / cmed["zero_shot"]}
        if args.full:
            r["few_shot_s"] = med[f"few_shot_{k}"]
            r["full_added_ratio"] = med[f"few_shot_{k}"] / med["zero_shot"] - 1
            r["full_added_ratio_cpu"] = cmed[f"few_shot_{k}"] / cmed["zero_shot"] - 1
        results[k] = r
        rows.append([k, entries, r["bank_mib_fp32"], r["bank_mib_fp16"], med["zero_shot"], r["search_s"],
                     f"{100 * r['added_ratio']:.1f}%", f"{100 * r['added_ratio_cpu']:.1f}%"]
                    + ([f"{100 * r['full_added_ratio']:.1f}%", f"{100 * r['full_added_ratio_cpu']:.1f}%"]
                       if args.full else []))
    print(f"\n{args.clip_model} @ {args.image_size}, {args.precision}, batch {args.batch_size}, "
          f"bank {'fp16' if args.bank_fp16 else 'fp32'}, device {device}, {args.repeats} repeats (median)")
    full_heads = ["full added (wall)", "full added (cpu)"] if args.full else []
    common.print_table(rows, ["K", "entries/map", "bank MiB fp32", "bank MiB fp16", "zero-shot s", "search s",
                              "added (wall)", "added (cpu)"] + full_heads)
    doc = {"config": {**common.config_dict(args, device), "shots": shots, "bank_fp16": args.bank_fp16},
           "machine": common.machine_info(device), "results": results,
           "times": {n: common.summary(t) for n, t in times.items()},
           "cpu_times": {n: common.summary(t) for n, t in cpu.items()}}
    common.finish(doc, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
