#!/usr/bin/env bash
# Run ON THE LENT GPU, from the repository root, after scripts/gpu_prepare.sh here:
#
#   device run, carry [".gpu-site"], timeout_s 600:
#     bash scripts/gpu_bench.sh dit-xl,mmdit-xl,dit-text-xl,dit-b
#
# Installs .gpu-site into /tmp/site, prints the GPU and the versions, then runs
# `sfumato bench train --gpu-matrix dit` (every DiT preset at 256 px in SD's latent space,
# bf16, SDPA, torch.compile, ZeRO-2; one process per row, an out-of-memory row retried at
# half the micro-batch) for the presets named (all twelve without an argument: about two
# minutes a row, so more than one 15-minute lease), JSON lines to $OUT/gpu-dit.jsonl.
set -uo pipefail
models=${1:-}
steps=${STEPS:-20}
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-site/*.whl || exit 1
tar -xzf .gpu-site/deepspeed.tar.gz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/platform/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed, diffusers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__)"
python3 -m sfumato.cli bench train --gpu-matrix dit ${models:+--models "$models"} --steps "$steps" \
    --out "$out/gpu-dit.jsonl" 2>&1 | tee "$out/gpu-dit.log"
