#!/usr/bin/env bash
# Every GPU check of the fast-trials work in one run, for a session that is lent a GPU machine (~10 min on one GPU):
# CUDA and bf16 visible, the throughput bench on CUDA (bf16, channels_last), and four trials packed on one GPU
# (--gpus-per-worker 0.25) against one trial alone, as aggregate images/s. Figures go to bench/RESULTS.md and $OUT.
# Usage: bash bench/gpu_checks.sh   (after: python3 -m venv .venv && .venv/bin/pip install -e ".[test,bench]")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; assert torch.cuda.is_available(); print('cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" \
  | tee -a "$OUT/device.txt"
# GPU utilisation sampled while the throughput bench runs.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/utilisation.csv" &
SAMPLER=$!
$PY -m bench.throughput --device cuda --bf16 --channels-last --batch 256 --rounds 3 --steps 10 --compile-cases \
  byol/resnet18/32,byol/resnet18/96 | tee "$OUT/throughput.md"
kill $SAMPLER
# Packed trials: the same 4 trials, one GPU each at a time vs four sharing one GPU; images/s summed over trials.
for share in 1 0.25; do
  concurrency=$([ "$share" = 1 ] && echo 1 || echo 4)
  .venv/bin/ssl-tune tune --trials 4 --epochs 3 --no-confirm --scheduler none --concurrency "$concurrency" \
    --gpus-per-worker "$share" --name "packed-$share" --set backbone.name=resnet18 --set optim.batch_size=256 \
    2>&1 | tail -5 | tee "$OUT/packed-$share.txt"
done
$PY - "$OUT" <<'PY' | tee -a "$OUT/packed.md"
import json, pathlib, sys
for share, concurrent in (("1", 1), ("0.25", 4)):
    rates = []
    for result in pathlib.Path("runs/sweeps", f"packed-{share}").rglob("result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        rates += [line["images_per_s"] for line in lines if "images_per_s" in line]
    mean = sum(rates) / max(len(rates), 1)
    print(f"gpus per trial {share}: {mean:.0f} images/s per trial, {concurrent * mean:.0f} aggregate ({len(rates)} epochs)")
PY
