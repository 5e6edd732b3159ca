"""The operator tells the approvers' channel (a Slack-compatible webhook) when a request is decided
or expires; the proxy tells it when one is created (tests/approvals)."""

from __future__ import annotations

import http.server
import json
import threading
import uuid

import pytest

from tests.fix_kube import KubePlane
from tests.fix_operator import Operator
from tests.fix_postgres import free_port, wait_until
from tests.operator.test_approvals import APPROVER_RBAC, decide, request_doc

RECEIVED: list[dict] = []


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        RECEIVED.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def operator(crds: KubePlane, tmp_path_factory: pytest.TempPathFactory) -> Operator:
    """This module's operator posts decisions to a local webhook."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    op = Operator(kube=crds, port=free_port(), config_name=f"dbguard-test-{uuid.uuid4().hex[:6]}",
                  namespace=crds.namespace("dbguard-system"), log_path=tmp_path_factory.mktemp("op") / "op.log",
                  extra_args=("--approval-notify-url", f"http://127.0.0.1:{server.server_address[1]}/hook"))
    op.start()
    try:
        yield op
    finally:
        op.stop()
        server.shutdown()
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            crds.kubectl("delete", kind, op.config_name, "--ignore-not-found", check=False)


def test_decisions_and_expiry_are_posted(op: Operator, kube_ns: str) -> None:
    op.kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    op.kube.kubectl("-n", kube_ns, "create", "-f", "-", input=request_doc("n1"))
    op.kube.kubectl("-n", kube_ns, "create", "-f", "-", input=request_doc("n2", expires_in=3))
    assert decide(op, kube_ns, "n1", "alice", "Approved", "CHG-1").returncode == 0
    wait_until(lambda: {m.get("request"): m for m in RECEIVED}.keys() >= {"n1", "n2"}, timeout=30,
               what="both notifications")
    by_request = {m["request"]: m for m in RECEIVED}
    assert by_request["n1"]["phase"] == "Approved" and "by alice" in by_request["n1"]["text"]
    assert by_request["n2"]["phase"] == "Expired" and f"{kube_ns}/n2" in by_request["n2"]["text"]
