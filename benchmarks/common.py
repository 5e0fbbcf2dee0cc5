"""Shared helpers for the performance benchmarks (issue 6).

Timing, peak memory, model building with random weights, JSON and table output.
Only the benchmarks import this file; the ``moeclip`` package does not depend on it.

Peak memory
-----------
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; the
  figure reported is the peak minus what was allocated before the measured region
  (model weights, cached text features, inputs), i.e. the extra memory of the step.
* CPU: the process's peak resident set size (``VmHWM``) minus its resident size
  (``VmRSS``) before the measured region. The peak is reset with
  ``/proc/self/clear_refs`` (Linux >= 4.0), so the figure is the largest RSS growth
  during the region, whatever happened before it. It includes allocator slack (glibc
  keeps some freed memory), so it is an upper bound of the live extra memory; measure
  each variant in a fresh process (the scripts do) so earlier runs do not pre-grow
  the heap. Where ``clear_refs`` cannot be written, ``ru_maxrss`` (lifetime peak)
  minus the starting RSS is used instead and flagged as ``rusage``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

DEFAULT_MODEL = "ViT-L-14-336"
DEFAULT_SIZE = 518
DESCRIPTION = "object"


# ---------------------------------------------------------------------------- arguments
def add_model_args(parser: argparse.ArgumentParser, batch_size: int = 1, image_size: int = DEFAULT_SIZE,
                   repeats: int = 5, warmup: int = 1) -> None:
    parser.add_argument("--clip-model", default=DEFAULT_MODEL, help="open_clip architecture (random weights)")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="fp32, or autocast to bf16/fp16 (frozen CLIP weights cast once, see --no-cast-frozen)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--no-cast-frozen", dest="cast_frozen", action="store_false",
                        help="bf16/fp16: leave the frozen CLIP weights in fp32 (autocast re-casts them at every "
                             "forward) instead of the package's default of casting them once")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")


def setup(args) -> torch.device:
    from moeclip.precision import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def cast_frozen(model, args) -> None:
    """What the package's commands do for bf16/fp16 (``MoECLIP.cast_frozen_weights``), unless
    ``--no-cast-frozen``. ``model.clip`` is shared, so the plain-CLIP baseline gets it too."""
    if getattr(args, "cast_frozen", True):
        model.cast_frozen_weights(args.precision)


def autocast(device: torch.device, precision: str):
    from moeclip.precision import autocast as _autocast

    return _autocast(device, precision)


def config_dict(args, device: torch.device) -> Dict[str, Any]:
    return {
        "clip_model": args.clip_model, "image_size": args.image_size, "batch_size": args.batch_size,
        "precision": args.precision, "device": str(device), "repeats": args.repeats, "warmup": args.warmup,
        "cast_frozen": bool(getattr(args, "cast_frozen", True)) and args.precision != "fp32",
        "weights": "random (pretrained=None)",
    }


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, cpu: Optional[List[float]] = None) -> float:
    """Wall seconds of ``fn()``; its process CPU seconds (all threads) appended to ``cpu``."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return dt


def bench(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
          log: bool = True, cpu_times: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Run every function ``warmup`` times, then ``repeats`` times interleaved (A B C A B C ...).

    Interleaving makes the ratios robust to load that comes and goes on a shared machine.
    Returns wall seconds per function; ``cpu_times``, if given, receives the process CPU
    seconds of the same runs (on a CPU shared with other jobs, CPU time with one torch
    thread is the steadier measure of work: waiting for a core does not count).
    """
    for i in range(warmup):
        for name, fn in fns.items():
            dt = timed(fn, device)
            if log:
                print(f"  warm-up {i + 1}/{warmup} {name}: {dt:.3f} s", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = cpu_times if cpu_times is not None else {}
    for name in fns:
        cpu.setdefault(name, [])
    for i in range(repeats):
        for name, fn in fns.items():
            dt = timed(fn, device, cpu[name])
            times[name].append(dt)
            if log:
                print(f"  run {i + 1}/{repeats} {name}: {dt:.3f} s (cpu {cpu[name][-1]:.3f} s)", flush=True)
    return times


def summary(times: Sequence[float]) -> Dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "mean": statistics.fmean(times),
            "all": [round(t, 6) for t in times]}


def count_ops(fn: Callable[[], Any], repeats: int = 3) -> Dict[str, float]:
    """Operations per call of ``fn`` from ``torch.profiler`` (issue 16): top-level aten ops (each
    one a dispatch, the per-operation overhead that dominates small models), all aten ops
    (nested included) and autograd nodes run in backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    events = list(prof.events())

    def is_aten(e) -> bool:
        return e.name.startswith("aten::")

    top = sum(1 for e in events if is_aten(e) and (e.cpu_parent is None or not is_aten(e.cpu_parent)))
    nodes = sum(1 for e in events if e.name.startswith("autograd::engine::evaluate_function"))
    return {"aten_ops_top_level": top / repeats, "aten_ops_all": sum(1 for e in events if is_aten(e)) / repeats,
            "autograd_nodes": nodes / repeats}


# ---------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Extra peak memory of a region: CUDA allocator peak, or RSS high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
        else:
            rss = _proc_status_kb("VmRSS")
            if rss is not None and _reset_peak_rss():
                self.method = "VmHWM-VmRSS (clear_refs)"
                self.baseline = rss * 1024
            else:
                self.method = "rusage"
                self.baseline = (rss or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak - self.baseline)

    def as_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "baseline_mib": mib(self.baseline), "peak_mib": mib(self.peak),
                "extra_mib": mib(self.extra_bytes)}


def mib(n: float) -> float:
    return round(n / 2 ** 20, 1)


# ---------------------------------------------------------------------------- models and data
def build_moeclip(clip_model: str, image_size: int, device: torch.device, seed: int = 0,
                  released: bool = False, randomize: bool = True):
    """MoECLIP on a random-weight CLIP; adapters randomised so routing and experts are non-trivial."""
    from moeclip.model.config import AdapterConfig, BackboneConfig, ModelConfig
    from moeclip.model.moeclip import MoECLIP

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=BackboneConfig(model=clip_model, pretrained=None, image_size=image_size),
                      adapter=AdapterConfig(released_training=released))
    model = MoECLIP.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    if randomize:
        randomize_adapters(model, seed)
    return model.to(device).eval()


@torch.no_grad()
def randomize_adapters(model, seed: int = 0, gate_std: float = 0.02, lora_b_std: float = 0.02) -> None:
    """Trained-looking adapters: random router gates (else every token ties) and non-zero LoRA B."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.startswith("moe.") and name.endswith("router.gate.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * gate_std)
        elif name.startswith("moe.") and name.endswith("experts.lora_B"):
            p.copy_(torch.randn(p.shape, generator=g) * lora_b_std)


def clip_floor_step(model, images: torch.Tensor, device: torch.device, precision: str) -> Callable[[], Any]:
    """The least an exact implementation must compute per training step, whatever its adapters.

    The frozen tower forward (no autograd up to the first MoE layer, autograd from there on)
    and the backward through the frozen blocks down to that layer, with frozen weights (input
    gradients only). Adapters, losses, PAA, projections, text and the optimiser are left out,
    so ``official / floor`` bounds any implementation's training-step speedup.
    """
    visual = model.clip.visual
    blocks = visual.transformer.resblocks
    cfg = model.adapter_config
    first, last = min(cfg.moe_layers), max(cfg.levels)

    def step():
        with autocast(device, precision):
            with torch.no_grad():
                x = visual._embeds(images.to(visual.conv1.weight.dtype))
                if model.sequence_first:
                    x = x.transpose(0, 1).contiguous()
                for i in range(first + 1):
                    x = blocks[i](x)
            x = x.detach().requires_grad_(True)
            y = x
            for i in range(first + 1, last):
                y = blocks[i](y)
        y.float().sum().backward()
        return x.grad
    return step


def clip_floor_infer(model, images: torch.Tensor, device: torch.device, precision: str) -> Callable[[], Any]:
    """The frozen tower alone (``encode_image``): what any implementation's inference contains."""
    def run():
        with autocast(device, precision), torch.inference_mode():
            return model.clip.encode_image(images)
    return run


def random_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """CLIP-normalised-looking images, masks with one anomalous rectangle on odd images, labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = torch.zeros(batch, 1, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    for i in range(1, batch, 2):
        y, x = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
        masks[i, :, y:y + size // 4, x:x + size // 4] = 1
        labels[i] = 1
    if batch == 1:  # keep one anomalous pixel region so every loss term is exercised
        masks[0, :, size // 4:size // 2, size // 4:size // 2] = 1
        labels[0] = 1
    return images.to(device), masks.to(device), labels.to(device)


# ---------------------------------------------------------------------------- reporting
def machine_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def finish(doc: Dict[str, Any], path: Optional[str]) -> None:
    try:
        doc.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1000 else f"{c:.1f}"
    return str(c)


def run_json_subprocess(argv: List[str], timeout: float) -> Dict[str, Any]:
    """Run ``python argv...`` with a ``--json`` file appended; return what it wrote."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, *argv, "--json", out]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, timeout=timeout)
        return json.loads(Path(out).read_text())

