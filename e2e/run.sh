#!/usr/bin/env bash
# The dbguard end-to-end run on a kind cluster, for machines with a container engine (docker):
# create a cluster, build the image, load it into the nodes, install the chart, run e2e/test_kind.py.
#
#   e2e/run.sh                 # everything, then delete the cluster
#   KEEP=1 e2e/run.sh          # keep the cluster afterwards (kind delete cluster --name dbguard-e2e)
#   e2e/run.sh -k approval     # extra arguments go to pytest
#
# Needs: docker, kind (>= 0.23, whose default node is Kubernetes >= 1.29), kubectl, helm (3.14+ or 4),
# and the project's virtualenv (make venv) for pytest. Environment:
#   DBGUARD_E2E_CLUSTER  kind cluster name (dbguard-e2e); reused when it exists
#   DBGUARD_E2E_IMAGE    image to build and load (ghcr.io/dbguard/dbguard:e2e)
#   KIND_NODE_IMAGE      kind node image, e.g. kindest/node:v1.31.2 (kind's default when empty)
#   KEEP=1               do not delete the cluster at the end
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${DBGUARD_E2E_CLUSTER:-dbguard-e2e}
image=${DBGUARD_E2E_IMAGE:-ghcr.io/dbguard/dbguard:e2e}
postgres_image=postgres:16-alpine
python=${PYTHON:-$root/.venv/bin/python}

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e/run.sh: $tool is needed (see e2e/README.md)" >&2; exit 2; }
done
[[ -x $python ]] || { echo "e2e/run.sh: no $python; run 'make venv' (or set PYTHON)" >&2; exit 2; }

created=0
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  created=1
fi
cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "---- operator log (last 200 lines) ----" >&2
    kubectl -n dbguard-system logs deploy/dbguard-operator --tail=200 >&2 || true
  fi
  if [[ ${KEEP:-0} != 1 && $created == 1 ]]; then
    kind delete cluster --name "$cluster"
  fi
  exit $rc
}
trap cleanup EXIT
export KUBECONFIG=${KUBECONFIG_E2E:-$(mktemp -t dbguard-e2e-kubeconfig.XXXXXX)}
kind get kubeconfig --name "$cluster" > "$KUBECONFIG"

echo "== building $image"
docker build -t "$image" --build-arg REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" "$root"
kind load docker-image "$image" --name "$cluster"
docker image inspect "$postgres_image" >/dev/null 2>&1 || docker pull "$postgres_image"
kind load docker-image "$postgres_image" --name "$cluster"

echo "== installing the chart"
# CRDs first and always (helm installs crds/ only on a first install, and never upgrades them).
kubectl apply --server-side --force-conflicts -f "$root/charts/dbguard/crds/"
helm upgrade --install dbguard "$root/charts/dbguard" --namespace dbguard-system --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
  --wait --timeout 5m
kubectl -n dbguard-system rollout status deployment/dbguard-operator --timeout=180s

echo "== scenarios"
cd "$root"
DBGUARD_E2E_IMAGE=$image DBGUARD_E2E_POSTGRES_IMAGE=$postgres_image \
  "$python" -m pytest e2e/ -v -p no:cacheprovider "$@"
