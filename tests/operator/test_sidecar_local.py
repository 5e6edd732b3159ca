"""The injected sidecar, run for real: there is no kubelet here, so the test plays its part.

It takes the container the webhook injected into a real pod, mounts what the kubelet would mount
(the Secret's password, the policy ConfigMaps, a real projected ServiceAccount token) at local
paths, and runs the same command against the real PostgreSQL. The proxy proves its pod's identity
with TokenReview, authenticated as the pod's own ServiceAccount (which works only because the
operator bound the TokenReview role), and a policy patched with kubectl reaches the running
proxy through the operator's ConfigMap without dropping the app's connection.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys

import psycopg
import pytest
import yaml

from tests.fix_kube import KubePlane
from tests.fix_operator import Operator
from tests.fix_postgres import APP_PASSWORD, Postgres, free_port, wait_until
from tests.operator.test_operator import MASKING, POLICY, pod_doc, status_of, wait_ready
from tests.session.test_policy_reload import ConfigMapDir

TOKEN_PATH = "/var/run/secrets/dbguard.io/serviceaccount/token"
PASSWORD_PATH = "/var/run/dbguard/database/password"
POLICY_ROOT = "/etc/dbguard/policies/"


class Kubelet:
    """What the kubelet does for the sidecar: volumes at local paths, $(VAR) expansion, the process."""

    def __init__(self, kube: KubePlane, ns: str, pod: dict, root: pathlib.Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.kube, self.ns, self.root = kube, ns, root
        self.container = pod["spec"]["initContainers"][0]
        self.policies: dict[str, ConfigMapDir] = {}
        self.port, self.metrics_port = free_port(), free_port()
        self.events = root / "events.jsonl"
        self.proc: subprocess.Popen | None = None

    def _secret(self, name: str, key: str) -> str:
        data = json.loads(self.kube.kubectl("-n", self.ns, "get", "secret", name, "-o", "json").stdout)["data"]
        return base64.b64decode(data[key]).decode()

    def sync_policy(self, name: str) -> None:
        cm = json.loads(self.kube.kubectl("-n", self.ns, "get", "cm", f"dbguard-policy-{name}", "-o", "json").stdout)
        if name not in self.policies:
            self.policies[name] = ConfigMapDir(self.root / "policies" / name)
        self.policies[name].publish(cm["data"])

    def args(self) -> list[str]:
        env = {}
        for e in self.container["env"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = self._secret(ref["name"], ref["key"])
        out = []
        for a in self.container["args"]:
            for k, v in env.items():
                a = a.replace(f"$({k})", v)
            if a == PASSWORD_PATH:
                a = str(self.root / "password")
            elif a == TOKEN_PATH:
                a = str(self.root / "token")
            elif a.startswith(POLICY_ROOT):
                name = a[len(POLICY_ROOT):].split("/")[0]
                self.sync_policy(name)
                a = str(self.root / "policies" / name / "policy.yaml")
            elif a.startswith("127.0.0.1:6432"):
                a = f"127.0.0.1:{self.port}"
            elif a.startswith("0.0.0.0:9187"):
                a = f"127.0.0.1:{self.metrics_port}"
            elif a == "-" and out and out[-1] == "--events":
                a = str(self.events)
            elif a == "kubernetes" and out and out[-1] == "--approvals":
                a = f"kubernetes:{self.ns}"  # in a pod, the namespace comes from the mounted namespace file
            out.append(a)
        return out

    def start(self, service_account: str) -> None:
        creds = self.container["volumeMounts"]
        assert any(m["mountPath"] == "/var/run/dbguard/database" for m in creds)
        (self.root / "password").write_text(self._secret("shop-db", "password"))
        # The projected token (audience dbguard) and the API token the ServiceAccount plugin would mount.
        token = self.kube.kubectl("-n", self.ns, "create", "token", service_account, "--audience", "dbguard",
                                  "--duration", "1h").stdout.strip()
        (self.root / "token").write_text(token)
        api_token = self.kube.kubectl("-n", self.ns, "create", "token", service_account, "--duration", "1h").stdout
        kubeconfig = self.kube.token_kubeconfig(api_token.strip(), self.root / "pod-kubeconfig")
        args = self.args()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dbguard", *args], env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "sidecar.log", "wb"))  # noqa: SIM115
        import urllib.request

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited:\n{(self.root / 'sidecar.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=30, interval=0.2, what="the sidecar's readiness probe")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def event_list(self) -> list[dict]:
        return [json.loads(x) for x in self.events.read_text().splitlines() if x.strip()] if self.events.exists() else []


@pytest.fixture
def sidecar(op: Operator, kube_ns: str, pg: Postgres, tmp_path: pathlib.Path) -> Kubelet:
    kube, ns = op.kube, kube_ns
    kube.kubectl("-n", ns, "create", "secret", "generic", "shop-db", "--from-literal=username=app",
                 f"--from-literal=password={APP_PASSWORD}")
    kube.kubectl("-n", ns, "create", "serviceaccount", "api")
    kube.kubectl("-n", ns, "apply", "-f", "-", input=POLICY)
    kube.kubectl("-n", ns, "apply", "-f", "-", input=MASKING)
    access = {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": "shop-api"},
              "spec": {"database": {"host": "127.0.0.1", "port": pg.port, "name": "app", "sslMode": "disable",
                                    "credentialsSecret": {"name": "shop-db"}},
                       "policies": ["shop-guardrails", "pii-masking"], "workloads": {"serviceAccounts": ["api"]}}}
    kube.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(access))
    wait_ready(op, "dba", ns, "shop-api", "True", timeout=40)
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-1", "shop-api", service_account="api"))
    kubelet = Kubelet(kube, ns, op.get("pod", ns, "api-1"), tmp_path)
    kubelet.start("api")
    yield kubelet
    kubelet.stop()


def test_the_injected_sidecar_governs_the_pod_as_its_service_account(op: Operator, sidecar: Kubelet,
                                                                     pg: Postgres) -> None:
    ns = sidecar.ns
    app_env = {e["name"]: e["value"] for e in op.get("pod", ns, "api-1")["spec"]["containers"][0]["env"]}
    # The app's DATABASE_URL, pointed at the sidecar's local port (no password: the pod is the identity).
    url = app_env["DATABASE_URL"].replace("127.0.0.1:6432", f"127.0.0.1:{sidecar.port}")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] > 0
        email = conn.execute("SELECT email FROM customers ORDER BY id LIMIT 1").fetchone()[0]
        assert email.startswith("****@"), email  # masked for a workload (only fraud sees clear text)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-unfiltered-writes"):
            conn.execute("DELETE FROM orders")
        # A policy change made with kubectl reaches the running sidecar through the operator.
        before = status_of(op, "gp", ns, "shop-guardrails")["revision"]
        op.kube.kubectl("-n", ns, "patch", "gp", "shop-guardrails", "--type", "json", "-p", json.dumps([
            {"op": "add", "path": "/spec/rules/0", "value": {
                "name": "no-order-deletes", "match": {"operations": ["DELETE"], "tables": ["orders"]},
                "action": "deny", "reason": "orders are never deleted"}}]))
        wait_until(lambda: status_of(op, "gp", ns, "shop-guardrails").get("revision") not in (None, before),
                   timeout=30, interval=0.3, what="the new revision to be published")
        sidecar.sync_policy("shop-guardrails")  # the kubelet's ConfigMap sync
        wait_until(lambda: any(e.get("event") == "reloaded" for e in sidecar.event_list()), timeout=20,
                   what="the sidecar to reload")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-order-deletes"):
            conn.execute("DELETE FROM orders WHERE id = -1")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the same connection throughout
    identities = {e["identity"]["user"] for e in sidecar.event_list() if e.get("kind") == "decision"}
    assert identities == {f"system:serviceaccount:{ns}:api"}
    connection = next(e for e in sidecar.event_list() if e.get("kind") == "connection")
    assert connection["identity"]["source"] == "workload"
    assert f"system:serviceaccounts:{ns}" in connection["identity"]["groups"]


APPROVER_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dbguard-test-carol-approves}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: dbguard-test-approver}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: carol}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: dbguard-test-approver}
rules:
- apiGroups: [dbguard.io]
  resources: [approvalrequests]
  verbs: [get, list, watch, patch, update]
"""


def test_a_held_statement_is_approved_by_kubectl_patch_and_runs_once(op: Operator, sidecar: Kubelet, pg: Postgres,
                                                                     tmp_path: pathlib.Path) -> None:
    ns, kube = sidecar.ns, op.kube
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    app_env = {e["name"]: e["value"] for e in op.get("pod", ns, "api-1")["spec"]["containers"][0]["env"]}
    url = app_env["DATABASE_URL"].replace("127.0.0.1:6432", f"127.0.0.1:{sidecar.port}")
    update = "UPDATE customers SET balance = balance + 1 WHERE id = 2"
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute(update)
    message = str(exc.value)
    name = message.split("approval request ")[1].split(" ")[0]
    assert f"kubectl -n {ns} patch approvalrequest {name}" in exc.value.diag.message_hint
    ar = op.get("approvalrequest", ns, name)
    assert ar["spec"]["requester"]["user"] == f"system:serviceaccount:{ns}:api"
    assert ar["spec"]["access"] == "shop-api" and ar["spec"]["statement"] == update
    assert ar["spec"]["estimatedRows"] == 1
    wait_until(lambda: (op.get("ar", ns, name).get("status") or {}).get("phase") == "Pending", timeout=20,
               what="the operator to mark the request Pending")
    patch = json.dumps({"spec": {"decision": "Approved", "reason": "CHG-9"}})
    assert kube.kubectl("-n", ns, "patch", "ar", name, "--type", "merge", "-p", patch, user="carol").returncode == 0
    # A second sidecar of the same pod races the first on the same approval: it runs once.
    second = Kubelet(kube, ns, op.get("pod", ns, "api-1"), tmp_path / "second")
    second.start("api")
    try:
        results: list[str] = []

        def send(port: int) -> None:
            with psycopg.connect(url.replace(str(sidecar.port), str(port)), autocommit=True) as c:
                try:
                    results.append(f"ran {c.execute(update).rowcount}")
                except psycopg.errors.InsufficientPrivilege:
                    results.append("refused")

        import threading

        threads = [threading.Thread(target=send, args=(p,)) for p in (sidecar.port, second.port)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == ["ran 1", "refused"], results
    finally:
        second.stop()
    assert pg.psql("SELECT balance FROM customers WHERE id = 2").strip() == "251.50"
    wait_until(lambda: ((op.get("ar", ns, name).get("status") or {}).get("execution") or {}).get("rowsAffected") == 1,
               timeout=20, what="the execution to be recorded")
    ar = op.get("ar", ns, name)
    assert ar["status"]["phase"] == "Executed" and ar["spec"]["approvals"][0]["user"] == "carol"
    table = kube.kubectl("-n", ns, "get", "ar", name).stdout
    assert "Executed" in table


def test_policy_status_counts_the_decisions_of_running_proxies(op: Operator, sidecar: Kubelet) -> None:
    ns, kube = sidecar.ns, op.kube
    pod = op.get("pod", ns, "api-1")
    assert pod["metadata"]["annotations"]["dbguard.io/metrics-port"] == "9187"
    app_env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    with psycopg.connect(app_env["DATABASE_URL"].replace("127.0.0.1:6432", f"127.0.0.1:{sidecar.port}"),
                         autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT count(*) FROM orders")
        for _ in range(2):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM orders")
    # No kubelet here: give the pod the address a kubelet would report, and the port the local sidecar uses.
    kube.kubectl("-n", ns, "annotate", "pod", "api-1", "--overwrite",
                 f"dbguard.io/metrics-port={sidecar.metrics_port}")
    kube.kubectl("-n", ns, "patch", "pod", "api-1", "--subresource", "status", "--type", "merge",
                 "-p", json.dumps({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}))

    def counted() -> dict | None:
        decisions = (op.get("gp", ns, "shop-guardrails").get("status") or {}).get("decisions") or {}
        return decisions if decisions.get("deny", 0) >= 2 else None

    decisions = wait_until(counted, timeout=60, interval=1, what="decision counts in the policy's status")
    assert decisions["deny"] == 2 and decisions["allow"] >= 3 and decisions["requireApproval"] == 0
