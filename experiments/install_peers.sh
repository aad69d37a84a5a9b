#!/usr/bin/env bash
# Installs carried wheels on the device machine (which cannot reach PyPI) into /tmp/site:
#   bash experiments/install_peers.sh .whl .peer && export PYTHONPATH=/tmp/site
# Each argument is a folder of wheels (downloaded here with `pip download --no-deps`, see
# WORKSPACE.md). tokamax imports xprof's kernel-stats tool for its own benchmarking only,
# which hydrax's benchmarks do not use: a one-line module stands in for the 32 MB xprof wheel
# and its dependencies.
set -euo pipefail
wheels=()
for d in "$@"; do wheels+=("$d"/*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${wheels[@]}"
if [ -d /tmp/site/tokamax ] && [ ! -d /tmp/site/xprof ]; then
  mkdir -p /tmp/site/xprof/cli
  touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
fi
