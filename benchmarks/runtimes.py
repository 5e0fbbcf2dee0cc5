"""CPU deployment runtimes, interleaved in one run: PyTorch fp32/bf16, onnxruntime, OpenVINO fp32/fp16 IR (and bf16).

Every runtime computes the same thing, preprocessed images (B, 3, S, S) -> raw anomaly maps and
raw image scores for one object (the text features are computed once, outside the timing), on a
random-weight CLIP with randomised adapters (speed does not depend on the values). The ONNX
model is exported once (``moeclip export onnx``'s graph) and both OpenVINO IRs are converted
from it (``moeclip export openvino [--fp16]``); ``openvino-bf16`` runs the fp32 IR with OpenVINO's
bf16 inference precision (``predict --openvino ... --precision bf16``), for CPUs with AMX / AVX-512
bf16. Before timing, each runtime's maps are compared with PyTorch fp32 on the same batch (``max_abs_map_diff``).

    python benchmarks/runtimes.py --clip-model ViT-B-16 --image-size 224 --batch-sizes 1,8 --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNTIMES = ("torch-fp32", "torch-bf16", "onnxruntime", "openvino-fp32", "openvino-fp16", "openvino-bf16")
OBJECT = "object"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip-model", default="ViT-B-16", help="open_clip architecture (random weights)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"subset of {','.join(RUNTIMES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", default="", metavar="RUNTIME@BATCH,...",
                   help="pairs not to time, e.g. torch-bf16@8 (emulated bf16 on CPUs without it takes minutes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every runtime (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build_runners(args, workdir: Path) -> Dict[str, Callable[[np.ndarray], Any]]:
    """name -> fn(batch as float32 numpy) computing maps and scores."""
    from moeclip.inference.detector import Detector
    from moeclip.inference.onnx import OnnxRuntime, export_onnx
    from moeclip.inference.openvino import OpenVINORuntime, export_openvino

    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(RUNTIMES))
    if unknown:
        raise SystemExit(f"unknown runtime(s) {unknown}")
    cpu = torch.device("cpu")
    fp32 = Detector(common.build_moeclip(args.clip_model, args.image_size, cpu, args.seed), device="cpu",
                    object=OBJECT)
    runners: Dict[str, Callable[[np.ndarray], Any]] = {}
    text = fp32.text_features(OBJECT)
    runners["torch-fp32"] = lambda x: fp32.predict_tensors(torch.from_numpy(x), OBJECT)
    fp32.text_features = lambda obj: text  # cached, as the exported graphs bake it in
    if "torch-bf16" in wanted:
        bf16 = Detector(common.build_moeclip(args.clip_model, args.image_size, cpu, args.seed), device="cpu",
                        precision="bf16", object=OBJECT)
        bf16_text = bf16.text_features(OBJECT)
        bf16.text_features = lambda obj: bf16_text
        runners["torch-bf16"] = lambda x: bf16.predict_tensors(torch.from_numpy(x), OBJECT)
    if any(r in wanted for r in ("onnxruntime", "openvino-fp32", "openvino-fp16", "openvino-bf16")):
        onnx_path = export_onnx(fp32, workdir / "model.onnx", object=OBJECT)
        print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.0f} MB)", flush=True)
        if "onnxruntime" in wanted:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            rt = OnnxRuntime(onnx_path)
            rt.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            runners["onnxruntime"] = rt.run
        # openvino-bf16: the fp32 IR computed in bf16 (INFERENCE_PRECISION_HINT), for CPUs with AMX/AVX-512 bf16
        for name, fp16, hint in (("openvino-fp32", False, "f32"), ("openvino-fp16", True, "f32"),
                                 ("openvino-bf16", False, "bf16")):
            if name in wanted:
                xml = export_openvino(None, workdir / name, fp16=fp16, onnx_path=onnx_path)
                runners[name] = OpenVINORuntime(xml, num_threads=args.threads, inference_precision=hint).run
    return {name: runners[name] for name in wanted if name in runners}


def maps_of(out) -> np.ndarray:
    return np.asarray(out["anomaly_map"].float().numpy() if torch.is_tensor(out["anomaly_map"])
                      else out["anomaly_map"], dtype=np.float32)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    doc: Dict[str, Any] = {"benchmark": "runtimes", "config": vars(args), "machine": common.machine_info(cpu),
                           "results": []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        runners = build_runners(args, Path(tmp))
        for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
            x = np.random.default_rng(args.seed).standard_normal((batch, 3, args.image_size, args.image_size),
                                                                 dtype=np.float32)
            ref = maps_of(runners["torch-fp32"](x)) if "torch-fp32" in runners else None
            skip = {s.strip() for s in args.skip.split(",") if s.strip()}
            diffs = {n: (None if ref is None or f"{n}@{batch}" in skip else
                         float(np.abs(maps_of(fn(x)) - ref).max())) for n, fn in runners.items()}
            shown = ", ".join(f"{n} {d:.2e}" for n, d in diffs.items() if d is not None)
            print(f"batch {batch}: max |map - torch fp32| {shown}", flush=True)
            cpu_times: Dict[str, list] = {}
            timed = {n: (lambda fn=fn: fn(x)) for n, fn in runners.items() if f"{n}@{batch}" not in skip}
            times = common.bench(timed, cpu, args.warmup, args.repeats, cpu_times=cpu_times)
            base = batch / common.summary(times["torch-fp32"])["median"] if "torch-fp32" in times else None
            for name, t in times.items():
                s = common.summary(t)
                ips = batch / s["median"]
                doc["results"].append({"runtime": name, "batch": batch, "seconds": s, "images_per_s": ips,
                                       "cpu_seconds_median": float(np.median(cpu_times[name])),
                                       "max_abs_map_diff": diffs[name]})
                cpu_s = float(np.median(cpu_times[name]))
                rows.append([name, batch, ips, ips / base if base else "", s["median"], cpu_s, diffs[name] or 0.0])
    common.print_table(rows, ["runtime", "batch", "images/s", "x torch fp32", "median s", "median cpu s",
                              "max |map diff|"])
    common.finish(doc, args.json)
    print(f"load average at end: {doc['machine'].get('loadavg_at_end')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
