#!/usr/bin/env bash
# The GPU performance suite of issue 6, meant to finish within ~5 minutes on one H200.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# ViT-L-14-336 at 518, bf16 autocast, random weights (speed does not depend on them):
#   overhead_b{1,8,32}.json   CLIP encode_image vs MoECLIP predict: s/batch, images/s, ratio,
#                             anomaly-map share
#   overhead_fp32_b8.json     the same in fp32 (TF32 matmuls) at batch 8
#   overhead_nocast_b{1,8}.json  bf16 with plain autocast (--no-cast-frozen): what casting the
#                             frozen CLIP weights once (the package default) saves
#   train_b8.json             one training step at batch 8, without and with gradient
#                             checkpointing: time and peak CUDA memory
#   mha_layout.json           diagnostic: one ViT-L block, batch_first (N,L,D) vs sequence-first
#                             (L,N,D) attention under bf16 autocast (see README, "layout")
#   vs_official.json          only when REFERENCE_DIR points at a checkout of the official code
#   serve_load.json           moeclip serve on loopback: req/s and p50/p99 with batching on/off, 1/8/32
#                             clients, overload (503s)
#   summary.txt               one table of the above
#
# Environment: PYTHON (default python), DEVICE (default cuda), REFERENCE_DIR (optional),
# STEP_TIMEOUT (seconds per step, default 240); for a smoke test elsewhere: CLIP_MODEL,
# IMAGE_SIZE, BATCHES (default "1 8 32"), TRAIN_BATCH (default 8), REPEAT_SCALE (divides the
# repeat counts, default 1). Each step runs under `timeout`; a failed or timed-out step is
# reported and the suite goes on; the exit status is 1 if any step failed.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python}
DEV=${DEVICE:-cuda}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
CLIP_MODEL=${CLIP_MODEL:-ViT-L-14-336}
IMAGE_SIZE=${IMAGE_SIZE:-518}
BATCHES=${BATCHES:-1 8 32}
TRAIN_BATCH=${TRAIN_BATCH:-8}
REPEAT_SCALE=${REPEAT_SCALE:-1}
MODEL="--clip-model $CLIP_MODEL --image-size $IMAGE_SIZE --device $DEV"
reps() { local r=$(( $1 / REPEAT_SCALE )); [ $r -lt 1 ] && r=1; echo $r; }
FAILED=()
START=$(date +%s)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# step NAME TIMEOUT_S COMMAND...: run, tee the log, record failures without stopping the suite
step() {
    local name=$1 limit=$2
    shift 2
    log "=== $name: $*"
    local rc=0
    timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
    wait  # let tee finish writing
    if [ $rc -ne 0 ]; then
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            log "!!! $name timed out after ${limit}s"
        else
            log "!!! $name failed (exit $rc), see $OUT/$name.log"
        fi
        FAILED+=("$name")
    fi
}

log "output: $OUT"
step env 60 "$PY" - "$DEV" <<'EOF'
import json, platform, sys, torch
import open_clip, moeclip
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "open_clip": open_clip.__version__,
        "python": platform.python_version(), "device": sys.argv[1]}
if sys.argv[1].startswith("cuda"):
    assert torch.cuda.is_available(), "CUDA is not available"
    info["gpu"] = torch.cuda.get_device_name(torch.device(sys.argv[1]))
print(json.dumps(info, indent=2))
EOF
if command -v nvidia-smi > /dev/null; then nvidia-smi | tee "$OUT/nvidia-smi.txt" || true; fi

for B in $BATCHES; do
    case $B in 1) R=30 ;; 8) R=15 ;; *) R=8 ;; esac
    step "overhead_b$B" "$STEP_TIMEOUT" "$PY" "$HERE/overhead.py" $MODEL --batch-size "$B" --precision bf16 \
        --warmup 3 --repeats "$(reps $R)" --json "$OUT/overhead_b$B.json"
done
for B in 1 $TRAIN_BATCH; do
    step "overhead_nocast_b$B" "$STEP_TIMEOUT" "$PY" "$HERE/overhead.py" $MODEL --batch-size "$B" --precision bf16 \
        --no-cast-frozen --warmup 3 --repeats "$(reps 15)" --json "$OUT/overhead_nocast_b$B.json"
done
step overhead_fp32_b$TRAIN_BATCH "$STEP_TIMEOUT" "$PY" "$HERE/overhead.py" $MODEL --batch-size "$TRAIN_BATCH" \
    --precision fp32 --warmup 3 --repeats "$(reps 10)" --json "$OUT/overhead_fp32_b$TRAIN_BATCH.json"
step train_b$TRAIN_BATCH $(( STEP_TIMEOUT * 2 )) "$PY" "$HERE/train_step.py" $MODEL --batch-size "$TRAIN_BATCH" \
    --precision bf16 --warmup 2 --repeats "$(reps 5)" --compare-grad-checkpoint --json "$OUT/train_b$TRAIN_BATCH.json"

step mha_layout 150 "$PY" - "$OUT/mha_layout.json" "$DEV" "$IMAGE_SIZE" "$BATCHES" "$(reps 10)" <<'EOF'
# Diagnostic: nn.MultiheadAttention with batch_first=True leaves its fused fast path under
# autocast (bf16 query vs fp32 in_proj_bias) or autograd; its slow path then runs the QKV
# projection on a transposed (L,N,D) view, which matmul cannot fold into one GEMM (a batched
# GEMM over an expanded weight). Same block, same weights, both layouts.
import json, sys, time, torch
from open_clip.transformer import ResidualAttentionBlock
out, dev = sys.argv[1], torch.device(sys.argv[2])
tokens = (int(sys.argv[3]) // 14) ** 2 + 1
batches, repeats = [int(b) for b in sys.argv[4].split()], int(sys.argv[5])
cuda = dev.type == "cuda"
def sync():
    if cuda:
        torch.cuda.synchronize(dev)
def peak():
    return torch.cuda.max_memory_allocated(dev) / 2 ** 20 if cuda else float("nan")
torch.manual_seed(0)
blk = ResidualAttentionBlock(1024, 16, batch_first=True).to(dev).eval()
for p in blk.parameters():
    p.requires_grad_(False)
res = {"tokens": tokens, "width": 1024, "autocast": "bf16"}
for B in batches:
    # bf16 input: under autocast open_clip's residual stream is bf16 (_embeds casts to the conv output dtype)
    x_nld = torch.randn(B, tokens, 1024, device=dev, dtype=torch.bfloat16)
    x_lnd = x_nld.transpose(0, 1).contiguous()
    for mode in ("infer", "train"):
        for layout in ("batch_first", "seq_first"):
            blk.attn.batch_first = layout == "batch_first"
            x = x_nld if layout == "batch_first" else x_lnd
            def run():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    if mode == "train":
                        y = blk(x.detach().requires_grad_(True))
                        y.float().sum().backward()
                    else:
                        with torch.inference_mode():
                            blk(x)
            run()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            ts = []
            for _ in range(repeats):
                sync(); t0 = time.perf_counter(); run(); sync()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            res[f"b{B}_{mode}_{layout}"] = {"median_ms": 1000 * ts[len(ts) // 2], "peak_mib": peak()}
            print(f"B={B:2d} {mode:5s} {layout:11s} {1000 * ts[len(ts) // 2]:9.2f} ms  peak {peak():8.0f} MiB",
                  flush=True)
            json.dump(res, open(out, "w"), indent=2)  # keep what is done if the step times out
blk.attn.batch_first = True
EOF

if [ -n "${REFERENCE_DIR:-}" ]; then
    step vs_official $(( STEP_TIMEOUT * 2 )) "$PY" "$HERE/vs_official.py" --reference-dir "$REFERENCE_DIR" $MODEL \
        --batch-size 2 --precision fp32 --warmup 2 --repeats 5 --json "$OUT/vs_official.json"
else
    log "REFERENCE_DIR not set: skipping vs_official"
fi

# the web service under load (issue 23): batching on (8) vs off, 1/8/32 clients, and an overload run
step serve_load $(( STEP_TIMEOUT + 120 )) "$PY" "$HERE/serve_load.py" $MODEL --precision bf16 --requests 400 \
    --max-seconds 25 --concurrency 1,8,32 --overload --json "$OUT/serve_load.json"

export CLIP_MODEL IMAGE_SIZE BATCHES TRAIN_BATCH
step summary 60 "$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
lines = [f"{os.environ.get('CLIP_MODEL', 'ViT-L-14-336')} @ {os.environ.get('IMAGE_SIZE', '518')}, random weights", "",
         f"{'run':18s} {'CLIP img/s':>11s} {'MoECLIP img/s':>14s} {'ratio':>7s} {'map share':>10s}"]
tb = os.environ.get("TRAIN_BATCH", "8")
names = [f"overhead_b{b}" for b in os.environ.get("BATCHES", "1 8 32").split()] + \
    ["overhead_nocast_b1", f"overhead_nocast_b{tb}", f"overhead_fp32_b{tb}"]
for name in names:
    d = load(name)
    if d:
        lines.append(f"{name:18s} {d['clip_images_per_s']:11.1f} {d['moeclip_images_per_s']:14.1f} "
                     f"{d['ratio']:7.3f} {100 * d['postproc_share']:9.2f}%")
    else:
        lines.append(f"{name:18s} (missing)")
t = load(f"train_b{tb}")
if t:
    lines += ["", f"train step, batch {tb}, bf16:",
              f"  no checkpointing: {t['step_s']:.3f} s, peak extra {t['peak_extra_mib']:.0f} MiB",
              f"  checkpointing:    {t['step_s_grad_checkpoint']:.3f} s, peak extra "
              f"{t['peak_extra_mib_grad_checkpoint']:.0f} MiB"]
m = load("mha_layout")
if m:
    lines += ["", "attention layout diagnostic (one block, bf16 autocast), ms:"]
    for k, r in m.items():
        if isinstance(r, dict):
            lines.append(f"  {k:28s} {r['median_ms']:9.2f}")
v = load("vs_official")
if v:
    lines += ["", "vs official (fp32, batch 2):"]
    if "inference" in v and "speedup" in v["inference"]:
        i = v["inference"]
        lines.append(f"  inference speedup x{i['speedup']:.2f} (ceiling: official / plain CLIP x{i['ceiling_speedup']:.2f})")
    for mode, tr in v.get("training", {}).items():
        if "speedup" in tr:
            lines.append(f"  train ({mode}) speedup x{tr['speedup']:.2f} (ceiling: official / frozen-tower "
                         f"floor x{tr['ceiling_speedup']:.2f})")
    if "memory_ratio" in v:
        lines.append(f"  memory official/ours: {v['memory_ratio']}")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
EOF

log "done in $(( $(date +%s) - START ))s; results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "failed steps: ${FAILED[*]}"
    exit 1
fi
