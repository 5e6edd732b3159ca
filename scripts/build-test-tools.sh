#!/usr/bin/env bash
# Builds the test tools dbguard's suite runs for real, from their Go modules (never prebuilt
# downloads), into ${DBGUARD_TOOLS_DIR:-$HOME/.cache/dbguard-tools}/bin, cached by a version stamp.
#
#   scripts/build-test-tools.sh opa     # OPA, for the embedded-vs-OPA differential policy test
#
# A cold OPA build takes about 3 minutes on 2 cores (measured 2026-11-25); a cached one, no time.
set -euo pipefail
OPA_VERSION=1.22.2
TOOLS=${DBGUARD_TOOLS_DIR:-$HOME/.cache/dbguard-tools}
BIN=$TOOLS/bin
mkdir -p "$BIN"
export GOTOOLCHAIN=local GOFLAGS=-modcacherw CGO_ENABLED=0 GOBIN=$BIN

command -v go >/dev/null || { echo "build-test-tools: Go is needed to build $* (install golang)" >&2; exit 1; }

build_opa() {
  local stamp="opa=$OPA_VERSION $(go env GOVERSION)"
  if [[ -x $BIN/opa && -f $BIN/.opa.stamp && "$(cat "$BIN/.opa.stamp")" == "$stamp" ]]; then
    echo "opa $OPA_VERSION up to date in $BIN"; return
  fi
  echo "building opa $OPA_VERSION from its Go module (first time: a few minutes) ..."
  go install -trimpath -ldflags "-s -w" "github.com/open-policy-agent/opa@v$OPA_VERSION"
  "$BIN/opa" version | head -1
  echo "$stamp" > "$BIN/.opa.stamp"
}

targets=("${@:-opa}")
for t in "${targets[@]}"; do
  case "$t" in
    opa|all) build_opa ;;
    *) echo "build-test-tools: unknown target '$t' (known: opa)" >&2; exit 2 ;;
  esac
done
