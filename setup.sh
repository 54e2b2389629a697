#!/usr/bin/env bash
# Set up mkopt in ./.venv (reused when present). Usage: ./setup.sh [dev]
#   ./setup.sh      library + recipes (the main job) and the Fashion-MNIST data when apt can install it
#   ./setup.sh dev  the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
extra="recipes"; [ "${1:-}" = "dev" ] && extra="dev"
say() { echo "setup.sh: $*"; }
[ -x .venv/bin/python ] || { say "creating .venv"; python3 -m venv .venv; }
# torch 2.14.1 / torchvision 0.29.1 are the releases this project is tested with (local wheels here).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  say "installing torch 2.14.1 and torchvision 0.29.1 into .venv (the largest step: a minute or two)"
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
say "installing mkopt (editable) and the '$extra' extra: $(.venv/bin/python - "$extra" <<'PY'
import sys
try:
    import tomllib  # Python >= 3.11
except ImportError:
    print("see [project.optional-dependencies] in pyproject.toml"); sys.exit()
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
def expand(name):
    out = []
    for item in extras[name]:
        out += [e for inner in item[6:-1].split(",") for e in expand(inner)] if item.startswith("mkopt[") else [item]
    return out
print(", ".join(dict.fromkeys(expand(sys.argv[1]))))
PY
)"
.venv/bin/pip install -q -e ".[$extra]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing the Fashion-MNIST data (apt package dataset-fashion-mnist)"
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }) >/dev/null \
    || echo "setup.sh: could not install dataset-fashion-mnist; the demo will say where it looks for the data" >&2
fi
say "done: .venv/bin/mkopt table1 runs the main job; .venv/bin/python -m pytest -q mkopt tests the tests"
