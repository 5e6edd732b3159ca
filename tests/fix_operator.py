"""The real ``dbguard operator`` command against the real API server, its webhooks on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import uuid

import pytest

from tests.fix_kube import KubePlane
from tests.fix_postgres import free_port, stop_process, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRDS = ("guardrailpolicies", "databaseaccesses", "approvalrequests")


def install_crds(kube: KubePlane) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for plural in CRDS:
        kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{plural}.dbguard.io")


@pytest.fixture(scope="session")
def crds(kube: KubePlane) -> KubePlane:
    install_crds(kube)
    return kube


@dataclasses.dataclass
class Operator:
    kube: KubePlane
    port: int
    config_name: str
    namespace: str
    log_path: pathlib.Path
    proc: subprocess.Popen | None = None
    metrics_port: int = dataclasses.field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()

    def start(self) -> None:
        args = [sys.executable, "-m", "dbguard", "operator", "--webhook-listen", f"127.0.0.1:{self.port}",
                "--webhook-url-host", "127.0.0.1", "--webhook-config-name", self.config_name,
                "--operator-namespace", self.namespace, "--proxy-image", "dbguard:test",
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *self.extra_args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     env={**self.kube.env(), "PYTHONUNBUFFERED": "1"})
        wait_until(self._serving, timeout=60, interval=0.2, what="the operator's webhook server")

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"dbguard operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        r = self.kube.kubectl("get", "mutatingwebhookconfiguration", self.config_name, "-o", "json", check=False)
        return r.returncode == 0 and str(self.port) in r.stdout

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, kind: str, namespace: str, name: str) -> dict:
        return json.loads(self.kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


@pytest.fixture(scope="module")
def operator(crds: KubePlane, tmp_path_factory: pytest.TempPathFactory) -> Operator:
    """One operator per test module: modules that test the API server alone (CRD schemas) see no
    webhooks and no status writes of an operator left running by another module."""
    ns = crds.namespace("dbguard-system")
    op = Operator(kube=crds, port=free_port(), config_name=f"dbguard-test-{uuid.uuid4().hex[:6]}", namespace=ns,
                  log_path=tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        # A webhook with failurePolicy Fail and no server would block later tests: remove ours.
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            crds.kubectl("delete", kind, op.config_name, "--ignore-not-found", check=False)
        if os.environ.get("DBGUARD_SHOW_OPERATOR_LOG"):
            print(op.log()[-8000:])


@pytest.fixture
def op(operator: Operator, request: pytest.FixtureRequest) -> Operator:
    """The module's operator, restarted if a test stopped it; prints its log when the test fails."""
    if operator.proc is None:
        operator.start()
    mark = len(operator.log())
    yield operator
    if operator.proc is None:
        operator.start()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- dbguard operator log ----\n" + operator.log()[mark:][-8000:])
