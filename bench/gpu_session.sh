#!/usr/bin/env bash
# The one GPU run of issue 12, < 8 min on one GPU: correctness on the device, ResNet-50 step time and peak memory
# (baseline vs MK fused / generic vs the fused floor; bf16, fp16 + GradScaler, bf16 + torch.compile), then the
# small models of bench/step_overhead.py on CUDA. Reports go to results/bench/ (each rewritten as it progresses).
# Usage: bench/gpu_session.sh            (PYTHON=... to pick the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
gpu=$($py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; import re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")  # e.g. nvidia-h200
# budget: start no ResNet-50 configuration after 230 s; a compiled configuration takes ~2-3 min
timeout 370 $py bench/gpu_resnet50.py --budget-seconds 230 --out "results/bench/gpu_resnet50_${gpu}.md" || echo "gpu_resnet50 stopped: $?" >&2
timeout 90 $py bench/step_overhead.py --device cuda --quick --no-memory --out "results/bench/step_overhead_cuda_${gpu}.md" || echo "step_overhead stopped: $?" >&2
