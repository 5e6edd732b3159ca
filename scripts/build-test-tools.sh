#!/usr/bin/env bash
# Builds the test tools dbguard's suite runs for real, from their Go modules (never prebuilt
# downloads), into ${DBGUARD_TOOLS_DIR:-$HOME/.cache/dbguard-tools}/bin, cached by a version stamp.
#
#   scripts/build-test-tools.sh opa     # OPA, for the embedded-vs-OPA differential policy test
#   scripts/build-test-tools.sh helm    # helm 4, for chart lint/template tests
#   scripts/build-test-tools.sh etcd    # etcd 3.6 (wrapper module: its go.mod has replace directives)
#   scripts/build-test-tools.sh k8s     # kube-apiserver + kubectl (wrapper module, staging replaces)
#   scripts/build-test-tools.sh all
#
# Measured on 2 cores (2026-11-25): OPA ~3 min cold, etcd 24 s, kube-apiserver + kubectl 3 min 5 s
# (with a warm Go module cache), helm 58 s; cached by the stamp, no time. See docs/dev-tools.md.
set -euo pipefail
OPA_VERSION=1.22.2
HELM_VERSION=4.2.4
ETCD_VERSION=3.6.14
K8S_VERSION=1.36.3
TOOLS=${DBGUARD_TOOLS_DIR:-$HOME/.cache/dbguard-tools}
BIN=$TOOLS/bin
mkdir -p "$BIN"
export GOTOOLCHAIN=local GOFLAGS=-modcacherw CGO_ENABLED=0 GOBIN=$BIN

command -v go >/dev/null || { echo "build-test-tools: Go is needed to build $* (install golang)" >&2; exit 1; }

build_opa() {
  local stamp
  stamp="opa=$OPA_VERSION $(go env GOVERSION)"
  if [[ -x $BIN/opa && -f $BIN/.opa.stamp && "$(cat "$BIN/.opa.stamp")" == "$stamp" ]]; then
    echo "opa $OPA_VERSION up to date in $BIN"; return
  fi
  echo "building opa $OPA_VERSION from its Go module (first time: a few minutes) ..."
  go install -trimpath -ldflags "-s -w" "github.com/open-policy-agent/opa@v$OPA_VERSION"
  "$BIN/opa" version | head -1
  echo "$stamp" > "$BIN/.opa.stamp"
}

stamped() {  # stamped NAME STAMP: true when NAME was built with exactly STAMP
  [[ -f $BIN/.$1.stamp && "$(cat "$BIN/.$1.stamp")" == "$2" ]]
}

build_helm() {
  local stamp
  stamp="helm=$HELM_VERSION $(go env GOVERSION)"
  if stamped helm "$stamp" && [[ -x $BIN/helm ]]; then echo "helm $HELM_VERSION up to date"; return; fi
  echo "building helm $HELM_VERSION ..."
  go install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION"
  "$BIN/helm" version
  echo "$stamp" > "$BIN/.helm.stamp"
}

build_etcd() {
  local stamp
  stamp="etcd=$ETCD_VERSION $(go env GOVERSION)"
  if stamped etcd "$stamp" && [[ -x $BIN/etcd ]]; then echo "etcd $ETCD_VERSION up to date"; return; fi
  echo "building etcd $ETCD_VERSION (wrapper module) ..."
  local w=$TOOLS/work/etcd
  mkdir -p "$w"
  printf 'module local/etcd-test-binary\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v%s\n\ntool go.etcd.io/etcd/server/v3\n' \
    "$ETCD_VERSION" > "$w/go.mod"
  (cd "$w" && rm -f go.sum && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
  "$BIN/etcd" --version | head -1
  echo "$stamp" > "$BIN/.etcd.stamp"
}

build_k8s() {
  local stamp
  stamp="k8s=$K8S_VERSION $(go env GOVERSION)"
  if stamped k8s "$stamp" && [[ -x $BIN/kube-apiserver && -x $BIN/kubectl ]]; then
    echo "kube-apiserver/kubectl $K8S_VERSION up to date"; return
  fi
  echo "building kube-apiserver and kubectl $K8S_VERSION (wrapper module; a few minutes) ..."
  local w=$TOOLS/work/k8s staging_version=v0.${K8S_VERSION#1.} tmp
  tmp=$(mktemp -d)
  # The staging modules are re-derived from the go.mod the proxy serves for this exact tag.
  (cd "$tmp" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION") > "$tmp/dl.json"
  local gomod
  gomod=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' "$tmp/dl.json")
  mapfile -t staging < <(sed -n 's|^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/k8s\.io/.*|\1|p' "$gomod")
  (( ${#staging[@]} >= 30 )) || { echo "unexpected staging list: ${staging[*]}" >&2; exit 1; }
  mkdir -p "$w"
  {
    printf 'module local/k8s-test-binaries\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v%s\n\nreplace (\n' "$K8S_VERSION"
    for m in "${staging[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
    printf ')\n\ntool (\n\tk8s.io/kubernetes/cmd/kube-apiserver\n\tk8s.io/kubernetes/cmd/kubectl\n)\n'
  } > "$w/go.mod"
  local minor ldf="-s -w"
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  (cd "$w" && rm -f go.sum && go mod tidy &&
    go install -trimpath -pgo=off -ldflags "$ldf" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$tmp"
  "$BIN/kube-apiserver" --version
  echo "$stamp" > "$BIN/.k8s.stamp"
}

targets=("${@:-opa}")
for t in "${targets[@]}"; do
  case "$t" in
    opa) build_opa ;;
    helm) build_helm ;;
    etcd) build_etcd ;;
    k8s) build_k8s ;;
    all) build_opa; build_helm; build_etcd; build_k8s ;;
    *) echo "build-test-tools: unknown target '$t' (known: opa helm etcd k8s all)" >&2; exit 2 ;;
  esac
done
