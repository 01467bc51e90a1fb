#!/usr/bin/env bash
# The benchmark suite's GPU mode: the same `bench/suite.py` with NCCL ranks, one per GPU.
#
#   bench/gpu.sh                # every GPU of this machine (a power of two of them, >= 2)
#   WORLD=4 bench/gpu.sh        # the first 4
#   PYTHON=/path/to/python bench/gpu.sh
#
# What runs on the GPUs: the runtime section (compiled DP / ZeRO-3 / TP / SP / PP against
# DDP / FSDP2 / DTensor TP and SP / torch pipelining, forked ranks on NCCL, a GPT of 8 x 1024,
# seq 1024, batch 16). What does not change: the search and predicted plan-quality tables
# and compile()'s time by pass (host work). Left out, and named in the report: the cost-model
# error and the measured plan quality, whose profiler and memory probe measure CPU ranks.
#
# Needs a CUDA build of torch (`pip install torch==2.13.0` from PyPI on Linux is one; the
# Makefile's `.venv` pins the CPU wheel of this project's machines) and the package with
# its bench extra: `pip install -e '.[bench]'`. The report lands in
# bench/results/gpu-<GPU name>/latest.md, with the GPU named in its first lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: $PYTHON has no CUDA torch (install one: pip install torch==2.13.0," \
         "then pip install -e '.[bench]')" >&2
    exit 2
fi
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
WORLD=${WORLD:-$GPUS}
if [ "$WORLD" -lt 2 ] || [ "$WORLD" -gt "$GPUS" ] || [ $((WORLD & (WORLD - 1))) -ne 0 ]; then
    echo "bench/gpu.sh: WORLD=$WORLD must be a power of two in 2..$GPUS (this machine has" \
         "$GPUS GPUs; NCCL needs one GPU per rank)" >&2
    exit 2
fi
NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))')
OUT=bench/results/gpu-$NAME
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/gpus.csv"
exec "$PYTHON" bench/suite.py --device cuda --world "$WORLD" --out "$OUT" "$@"
