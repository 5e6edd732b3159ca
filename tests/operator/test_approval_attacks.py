"""A workload's ServiceAccount may create ApprovalRequests and write their status (its sidecar needs
to). These were exploits found by the red-team pass; each must now fail."""

from __future__ import annotations

import datetime
import json
import subprocess

import psycopg
import pytest
import yaml

from dbguard.approvals.store import fingerprint
from tests.fix_kube import KubePlane
from tests.fix_operator import Operator
from tests.fix_postgres import Postgres, wait_until
from tests.operator.test_sidecar_local import APPROVER_RBAC, Kubelet


def as_workload(kube: KubePlane, ns: str, token: str, *args: str, input: str | None = None):  # noqa: ANN201
    cmd = [str(kube.bin / "kubectl"), "--server", kube.server, "--certificate-authority", str(kube.ca_file),
           "--token", token, "-n", ns, *args]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, env=kube.env(), timeout=60)


def app_url(op: Operator, kubelet: Kubelet) -> str:
    env = {e["name"]: e["value"] for e in op.get("pod", kubelet.ns, "api-1")["spec"]["containers"][0]["env"]}
    return env["DATABASE_URL"].replace("127.0.0.1:6432", f"127.0.0.1:{kubelet.port}")


def forged(ns: str, name: str, *, statement: str, shown: str, approvers: dict) -> str:
    me = f"system:serviceaccount:{ns}:api"
    fp = fingerprint(statement, (), "app", me)
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return yaml.safe_dump({"apiVersion": "dbguard.io/v1alpha1", "kind": "ApprovalRequest",
                           "metadata": {"name": name, "labels": {"dbguard.io/fingerprint": fp[:40]}},
                           "spec": {"requester": {"user": me, "groups": []}, "database": "app", "operation": "UPDATE",
                                    "statement": shown, "parameters": [], "fingerprint": fp,
                                    "rule": {"name": "balance-change-needs-approval", "policy": "shop-guardrails",
                                             "reason": "x"},
                                    "approvers": approvers, "minApprovals": 1, "expiresAt": expires}})


@pytest.mark.parametrize("case", ["shows-another-statement", "picks-its-own-approvers"])
def test_a_forged_request_never_runs(op: Operator, sidecar: Kubelet, pg: Postgres, case: str) -> None:
    ns, kube = sidecar.ns, op.kube
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC.replace("name: carol", "name: dave")
                 .replace("dbguard-test-carol-approves", "dbguard-test-dave-approves"))
    token = kube.kubectl("-n", ns, "create", "token", "api").stdout.strip()
    evil = "UPDATE customers SET balance = 0 WHERE id = 2"
    if case == "shows-another-statement":
        doc = forged(ns, "forged", statement=evil, shown="UPDATE customers SET balance = balance + 1 WHERE id = 2",
                     approvers={"groups": ["dba"], "users": []})
        approver = "carol"
    else:
        doc = forged(ns, "forged", statement=evil, shown=evil, approvers={"groups": [], "users": ["dave"]})
        approver = "dave"  # support, not a dba: only the forged request names them
    assert as_workload(kube, ns, token, "create", "-f", "-", input=doc).returncode == 0
    patch = json.dumps({"spec": {"decision": "Approved", "reason": "looks fine"}})
    assert kube.kubectl("-n", ns, "patch", "ar", "forged", "--type", "merge", "-p", patch, user=approver).returncode == 0
    with psycopg.connect(app_url(op, sidecar), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute(evil)
    assert "forged" not in str(exc.value)  # a new request of the proxy's own, pending
    assert pg.psql("SELECT balance FROM customers WHERE id = 2").strip() == "250.50"
    ignored = [e for e in sidecar.event_list() if e.get("kind") == "approval" and e.get("event") == "ignored"]
    assert ignored and ignored[0]["request"] == "forged"


def test_the_workload_cannot_reset_an_executed_request(op: Operator, sidecar: Kubelet, pg: Postgres) -> None:
    ns, kube = sidecar.ns, op.kube
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    token = kube.kubectl("-n", ns, "create", "token", "api").stdout.strip()
    update = "UPDATE customers SET balance = balance + 1 WHERE id = 2"
    url = app_url(op, sidecar)
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute(update)
    name = str(exc.value).split("approval request ")[1].split(" ")[0]
    patch = json.dumps({"spec": {"decision": "Approved", "reason": "CHG-9 once"}})
    assert kube.kubectl("-n", ns, "patch", "ar", name, "--type", "merge", "-p", patch, user="carol").returncode == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(update)
        wait_until(lambda: ((op.get("ar", ns, name).get("status") or {}).get("execution") or {}).get(
            "rowsAffected") == 1, timeout=20, what="the execution to be recorded")
        reset = as_workload(kube, ns, token, "patch", "ar", name, "--subresource", "status", "--type", "json", "-p",
                            json.dumps([{"op": "replace", "path": "/status", "value": {"phase": "Approved"}}]))
        assert reset.returncode != 0 and "stays Executed" in reset.stderr, reset.stderr
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(update)  # no replay
    assert pg.psql("SELECT balance FROM customers WHERE id = 2").strip() == "251.50"
