#!/usr/bin/env bash
# Installs what dbguard's demo, tests and benchmarks need from Debian's packages, if missing:
# PostgreSQL (server, client, pgbench), PgBouncer (benchmark comparison), openssl, ss (iproute2), shellcheck,
# and a C compiler with Python's headers for the compiled DataRow masker (dbguard/masking/_rowmask.c).
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v openssl >/dev/null || need+=(openssl)
command -v runuser >/dev/null || need+=(util-linux)
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v ss >/dev/null || need+=(iproute2)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
${PY:-python3} -c 'import os, sysconfig; raise SystemExit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  2>/dev/null || need+=(python3-dev)
if ((${#need[@]})); then
  echo "installing system packages: ${need[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
