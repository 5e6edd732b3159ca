#!/usr/bin/env bash
# Copies the CRDs (crds/, the source of truth) into the Helm chart (charts/dbguard/crds/), which
# installs them on `helm install`. tests/chart/test_chart.py fails when the copies differ.
#
#   scripts/sync-chart-crds.sh          # copy
#   scripts/sync-chart-crds.sh --check  # exit 1 (and say which) when the chart's copies are stale
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/crds
dst=$root/charts/dbguard/crds

if [[ ${1:-} == --check ]]; then
  stale=0
  for f in "$src"/*.yaml; do
    cmp -s "$f" "$dst/$(basename "$f")" || { echo "stale: charts/dbguard/crds/$(basename "$f")" >&2; stale=1; }
  done
  for f in "$dst"/*.yaml; do
    [[ -e $src/$(basename "$f") ]] || { echo "extra: charts/dbguard/crds/$(basename "$f")" >&2; stale=1; }
  done
  exit $stale
fi

mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
copied=("$dst"/*.yaml)
echo "copied ${#copied[@]} CRDs into charts/dbguard/crds/"
