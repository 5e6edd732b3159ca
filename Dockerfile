# syntax=docker/dockerfile:1
# dbguard: one image for the operator (`dbguard operator`) and for the proxy sidecar it injects
# (`dbguard proxy ...`). Built and loaded by e2e/run.sh; installed by charts/dbguard.
#
#   docker build -t ghcr.io/dbguard/dbguard:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#
# Runs as the numeric user 65532 (Kubernetes can check runAsNonRoot) with a read-only root file
# system: nothing is written outside /tmp (HOME=/tmp, no bytecode writes; the chart and the
# sidecar mount an emptyDir there when something needs it).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/dbguard
WORKDIR /src
# The compiled dependencies (pglast, regopy, uvloop, psycopg-binary, ...) come as manylinux wheels
# (some need glibc 2.34; bookworm has 2.36). dbguard's own DataRow masker is C (masking/_rowmask.c):
# gcc builds it in this stage only; the runtime image gets the built module, not the compiler.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY operator ./operator
# pip byte-compiles the venv here, so the read-only runtime never has to. The import line proves
# both commands' modules load, and that the masker was compiled (it is optional to pip).
RUN /opt/dbguard/bin/pip install . \
 && /opt/dbguard/bin/python -c "import dbguard.cli, dbguard.session.cli, dbguard.controller.handlers, dbguard.masking._rowmask" \
 && /opt/dbguard/bin/dbguard --help >/dev/null

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dbguard" \
      org.opencontainers.image.description="Identity-aware PostgreSQL governance proxy and Kubernetes operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/dbguard/dbguard" \
      org.opencontainers.image.documentation="https://github.com/dbguard/dbguard/blob/main/docs/install.md"
# A passwd entry for 65532, so that libraries asking "who am I" (libpq, getpass) get an answer.
RUN groupadd --system --gid 65532 dbguard \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin dbguard
COPY --from=build /opt/dbguard /opt/dbguard
ENV PATH=/opt/dbguard/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 65532:65532
ENTRYPOINT ["dbguard"]
CMD ["--help"]
