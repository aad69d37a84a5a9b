#!/usr/bin/env bash
# Installs carried packages on the device machine (which cannot reach PyPI) into /tmp/site
# (or $PEER_SITE):
#   bash experiments/install_peers.sh .whl .peer && export PYTHONPATH=/tmp/site
# Each argument is a folder of wheels (downloaded here with `pip download --no-deps`, see
# WORKSPACE.md) and of unpacked wheels re-packed as NAME.tar.xz (FlashInfer's 62 MB wheel is
# 16 MB so), which are extracted into /tmp/site as they are. tokamax imports xprof's
# kernel-stats tool for its own benchmarking only, which hydrax's benchmarks do not use: a
# one-line module stands in for the 32 MB xprof wheel and its dependencies.
set -euo pipefail
shopt -s nullglob
site="${PEER_SITE:-/tmp/site}"
wheels=()
archives=()
for d in "$@"; do
  wheels+=("$d"/*.whl)
  archives+=("$d"/*.tar.xz)
done
mkdir -p "$site"
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${wheels[@]}"
fi
for f in "${archives[@]}"; do tar -xJf "$f" -C "$site"; done
if [ -d "$site"/tokamax ] && [ ! -d "$site"/xprof ]; then
  mkdir -p "$site"/xprof/cli
  touch "$site"/xprof/__init__.py "$site"/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None" > "$site"/xprof/cli/tools.py
fi
