#!/usr/bin/env bash
# Set up mkopt in ./.venv (reused when present). Usage: ./setup.sh [dev]
#   ./setup.sh      library + recipes (the main job) and the Fashion-MNIST data when apt can install it
#   ./setup.sh dev  the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
extra="recipes"; [ "${1:-}" = "dev" ] && extra="dev"
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is tested with (local wheels here).
.venv/bin/python -c "import torch, torchvision" 2>/dev/null || .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[$extra]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }) >/dev/null \
    || echo "setup.sh: could not install dataset-fashion-mnist; the demo will say where it looks for the data" >&2
fi
