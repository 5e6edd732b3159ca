"""The chart's gateway, run for real: there is no kubelet here, so the test plays its part.

It renders the chart with the gateway on, applies the gateway's own ServiceAccount, Role, RoleBinding
and TokenReview ClusterRoleBinding to the real API server (where the real operator compiles and
publishes the GuardrailPolicies), lays out every volume of the gateway's pod at local paths from the
real Secrets and ConfigMaps, expands its environment, and runs its exact command against the real
PostgreSQL, with the ServiceAccount's own token as its credentials. Then a person's Kubernetes token
logs in over TLS and goes through the user stories: a read with PII masked, a DROP refused, a balance
UPDATE refused until an approver patches its ApprovalRequest and then run once. An app pod's injected
sidecar (run the same way) writes the same PostgreSQL ledger, and the 2 a.m. question is answered
from it with ``dbguard audit search``, naming both.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.request

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import fix_kube
from tests.audit.conftest import ledger_db  # noqa: F401 - a fixture
from tests.audit.test_row_evidence import drop_dbguard_slots
from tests.chart.conftest import CHART, Helm
from tests.chart.test_chart import GATEWAY
from tests.fix_kube import KubePlane
from tests.fix_operator import Operator
from tests.fix_postgres import APP_PASSWORD, Postgres, free_port, wait_until
from tests.operator.test_operator import MASKING, POLICY, pod_doc, wait_ready
from tests.operator.test_sidecar_local import APPROVER_RBAC
from tests.session.test_policy_reload import ConfigMapDir

GATEWAY_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRoleBinding")


class Kubelet:
    """What the kubelet does for one container of a pod: its volumes (Secrets, ConfigMaps, projected
    ServiceAccount tokens, emptyDirs) at local paths, its $(VAR) expansion, its ports on free local ones,
    and the process, with the pod's ServiceAccount as its in-cluster credentials."""

    def __init__(self, kube: KubePlane, ns: str, pod_spec: dict, container: dict, root: pathlib.Path) -> None:
        self.kube, self.ns, self.root, self.spec, self.container = kube, ns, root, pod_spec, container
        self.service_account = pod_spec.get("serviceAccountName") or "default"
        self.port, self.metrics_port = free_port(), free_port()
        self.dirs: dict[str, ConfigMapDir] = {}
        self.proc: subprocess.Popen | None = None
        self.events = root / "events.jsonl"

    def _object(self, kind: str, name: str) -> dict | None:
        r = self.kube.kubectl("-n", self.ns, "get", kind, name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def _data(self, kind: str, name: str) -> dict[str, str]:
        obj = self._object(kind, name)
        if obj is None and (kind, name) == ("configmap", "kube-root-ca.crt"):
            return {"ca.crt": self.kube.ca_file.read_text()}  # published by a controller-manager (none here)
        assert obj is not None, f"{kind} {name} is missing: the kubelet would not start the pod"
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
        return obj["data"]

    @staticmethod
    def _items(data: dict[str, str], items: list[dict] | None) -> dict[str, str]:
        return {i["path"]: data[i["key"]] for i in items} if items else data

    def _files(self, volume: dict) -> dict[str, str]:
        if "configMap" in volume:
            return self._items(self._data("configmap", volume["configMap"]["name"]), volume["configMap"].get("items"))
        if "secret" in volume:
            return self._items(self._data("secret", volume["secret"]["secretName"]), volume["secret"].get("items"))
        files: dict[str, str] = {}
        for source in (volume.get("projected") or {}).get("sources", []):
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                audience = ["--audience", sat["audience"]] if sat.get("audience") else []
                files[sat["path"]] = self.kube.kubectl("-n", self.ns, "create", "token", self.service_account,
                                                       *audience, "--duration", "1h").stdout.strip()
            elif "configMap" in source:
                files.update(self._items(self._data("configmap", source["configMap"]["name"]),
                                         source["configMap"].get("items")))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"]["items"]:
                    assert item["fieldRef"]["fieldPath"] == "metadata.namespace", item
                    files[item["path"]] = self.ns
        return files  # an emptyDir: nothing

    def sync(self) -> None:
        """Lay out (or refresh, like the kubelet's sync loop) every volume the container mounts."""
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for mount in self.container["volumeMounts"]:
            name = mount["name"]
            if name not in self.dirs:
                self.dirs[name] = ConfigMapDir(self.root / "volumes" / name)
            files = self._files(volumes[name])
            if files:
                self.dirs[name].publish(files)

    def local(self, arg: str) -> str:
        """A path under a mount (the whole argument, or the value of --flag=PATH) -> the local path."""
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        for mount in sorted(self.container["volumeMounts"], key=lambda m: -len(m["mountPath"])):
            if value == mount["mountPath"] or value.startswith(mount["mountPath"] + "/"):
                value = str(self.dirs[mount["name"]].root) + value[len(mount["mountPath"]):]
                break
        return flag + eq + value

    def args(self) -> list[str]:
        self.env = {}
        for e in self.container.get("env") or []:
            ref = e["valueFrom"]["secretKeyRef"] if "valueFrom" in e else None
            self.env[e["name"]] = self._data("secret", ref["name"])[ref["key"]] if ref else e["value"]
        out: list[str] = []
        for arg in self.container["args"]:
            for k, v in self.env.items():
                arg = arg.replace(f"$({k})", v)
            for host in ("0.0.0.0", "127.0.0.1"):  # the proxy's port and its metrics port, on free local ones
                arg = arg.replace(f"{host}:6432", f"127.0.0.1:{self.port}")
                arg = arg.replace(f"{host}:9187", f"127.0.0.1:{self.metrics_port}")
            if arg == "kubernetes" and out and out[-1] == "--approvals":
                arg = f"kubernetes:{self.ns}"  # in a pod, the namespace comes from the mounted namespace file
            out.append(self.local(arg))
        return out

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sync()
        api_token = self.kube.kubectl("-n", self.ns, "create", "token", self.service_account, "--duration", "1h").stdout
        kubeconfig = self.kube.token_kubeconfig(api_token.strip(), self.root / "in-cluster.kubeconfig")
        args = self.args()
        env = {**os.environ, **self.env, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
               "NO_PROXY": "127.0.0.1", "HOME": str(self.root)}
        self.proc = subprocess.Popen([sys.executable, "-m", "dbguard", *args], env=env,
                                     stdout=open(self.events, "wb"),  # noqa: SIM115 - --events=- / -
                                     stderr=open(self.root / "proxy.log", "wb"))  # noqa: SIM115

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.container['name']} exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=30, interval=0.2, what=f"the readiness probe of {self.container['name']}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)

    def log(self) -> str:
        path = self.root / "proxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture
def gateway(op: Operator, kube_ns: str, pg: Postgres, ledger_db: str, helm: Helm,  # noqa: F811 - the fixture
            tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Kubelet:
    kube, ns = op.kube, kube_ns
    release = f"t{ns[-8:]}"  # cluster-scoped names (the TokenReview binding) stay unique per test
    values = [*GATEWAY, "--set", f"gateway.namespace={ns}", "--set", "gateway.database.host=127.0.0.1",
              "--set", f"gateway.database.port={pg.port}", "--set", "gateway.database.name=app",
              "--set", "gateway.database.sslMode=disable", "--set", "gateway.ledger.secret.name=dbguard-ledger",
              "--set", "gateway.ledger.signingKeySecret.name=dbguard-ledger-key", "--set", "gateway.rowEvidence.enabled=true"]
    rendered = [d for d in yaml.safe_load_all(helm.run("template", release, str(CHART), "--namespace", "dbguard-system",
                                                        *values).stdout) if d]
    ours = [d for d in rendered if d["kind"] in GATEWAY_KINDS
            and d["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"]
    assert sorted(d["kind"] for d in ours) == sorted(GATEWAY_KINDS)
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(ours))
    # What the platform team provides: the credentials, the ledger's URL, the TLS certificate.
    kube.kubectl("-n", ns, "create", "secret", "generic", "shop-db", "--from-literal=username=app",
                 f"--from-literal=password={APP_PASSWORD}")
    kube.kubectl("-n", ns, "create", "secret", "generic", "dbguard-ledger", f"--from-literal=url={ledger_db}")
    # The key that signs the ledger's checkpoints (the auditors keep the public half).
    keygen = subprocess.run([sys.executable, "-m", "dbguard", "audit", "keygen", "--private-key",
                             str(tmp_path / "ledger.key"), "--public-key", str(tmp_path / "ledger.pub")],
                            capture_output=True, text=True, timeout=60)
    assert keygen.returncode == 0, keygen.stderr
    kube.kubectl("-n", ns, "create", "secret", "generic", "dbguard-ledger-key",
                 f"--from-file=ledger.key={tmp_path / 'ledger.key'}")
    cert, key = fix_kube.TestCA.create("gateway-ca").issue("dbguard-gateway", server=True)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    kube.kubectl("-n", ns, "create", "secret", "tls", "gateway-tls", f"--cert={tmp_path / 'tls.crt'}",
                 f"--key={tmp_path / 'tls.key'}")
    # The policies, compiled and published by the operator beside the gateway.
    kube.kubectl("-n", ns, "apply", "-f", "-", input=POLICY)
    kube.kubectl("-n", ns, "apply", "-f", "-", input=MASKING)
    for name in ("shop-guardrails", "pii-masking"):
        wait_ready(op, "gp", ns, name, "True")
    deployment = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
    spec = deployment["spec"]["template"]["spec"]
    pod = Kubelet(kube, ns, spec, spec["containers"][0], tmp_path / "gateway")
    pod.ledger_url = ledger_db
    # Row evidence (gateway.rowEvidence): what the DBA grants the gateway's database role.
    pg.psql("ALTER ROLE app REPLICATION", db="postgres")
    pg.psql("ALTER TABLE customers REPLICA IDENTITY FULL")
    pod.start()
    yield pod
    pod.stop()
    drop_dbguard_slots(pg)
    pg.psql("DROP PUBLICATION IF EXISTS dbguard_rows")
    pg.psql("ALTER ROLE app NOREPLICATION", db="postgres")
    kube.kubectl("delete", "clusterrolebinding", f"{release}-dbguard-gateway-tokenreview", "--ignore-not-found",
                 check=False)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- gateway log ----\n" + pod.log()[-6000:])


def test_a_person_with_a_kubernetes_token_goes_through_the_gateway(op: Operator, gateway: Kubelet, pg: Postgres,
                                                                   tmp_path: pathlib.Path) -> None:
    kube, ns = op.kube, gateway.ns
    kube.kubectl("apply", "-f", "-", input=APPROVER_RBAC)  # carol (group dba) may decide
    kube.kubectl("-n", ns, "create", "serviceaccount", "reports")
    token = kube.kubectl("-n", ns, "create", "token", "reports", "--audience", "dbguard").stdout.strip()
    started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    dsn = f"host=127.0.0.1 port={gateway.port} dbname=app user={ns}:reports sslmode=require"

    # No TLS, no login: the token never crosses the network in clear.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn.replace("sslmode=require", "sslmode=disable"), password=token).close()
    with pytest.raises(psycopg.OperationalError, match="token authentication failed"):
        psycopg.connect(dsn, password=token[:-4] + "AAAA").close()

    update = "UPDATE customers SET balance = balance + 10 WHERE id = 1"
    with psycopg.connect(dsn, password=token, autocommit=True) as conn:
        # PII masked for this identity; the rest reads through.
        email, name = conn.execute("SELECT email, name FROM customers WHERE id = 1").fetchone()
        assert email.startswith("****@") and name == "Ada"
        # DROP refused, naming the rule; the connection goes on.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop-table"):
            conn.execute("DROP TABLE customers")
        # A balance change: refused with the ApprovalRequest that would let it run.
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as held:
            conn.execute(update)
    name = str(held.value).split("approval request ")[1].split(" ")[0]
    assert f"kubectl -n {ns} patch approvalrequest {name}" in held.value.diag.message_hint
    request = op.get("approvalrequest", ns, name)
    assert request["spec"]["requester"]["user"] == f"system:serviceaccount:{ns}:reports"
    assert request["spec"]["statement"] == update
    wait_until(lambda: (op.get("ar", ns, name).get("status") or {}).get("phase") == "Pending", timeout=20,
               interval=0.3, what="the operator to mark the request Pending")
    patch = json.dumps({"spec": {"decision": "Approved", "reason": "CHG-7"}})
    kube.kubectl("-n", ns, "patch", "approvalrequest", name, "--type", "merge", "-p", patch, user="carol")
    wait_until(lambda: op.get("ar", ns, name)["status"].get("phase") == "Approved", timeout=20, interval=0.3,
               what="phase Approved")
    with psycopg.connect(dsn, password=token, autocommit=True) as conn:
        assert conn.execute(update).rowcount == 1  # the identical statement, once approved, runs once
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(update)  # ... and only once
    assert pg.psql("SELECT balance FROM customers WHERE id = 1").strip() == "110.00"
    wait_until(lambda: op.get("ar", ns, name)["status"].get("phase") == "Executed", timeout=20, interval=0.3,
               what="phase Executed")

    # An app pod's injected sidecar, from a DatabaseAccess whose proxies write the same ledger.
    kube.kubectl("-n", ns, "create", "serviceaccount", "api")
    access = {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": "shop-api"},
              "spec": {"database": {"host": "127.0.0.1", "port": pg.port, "name": "app", "sslMode": "disable",
                                    "credentialsSecret": {"name": "shop-db"}},
                       "policies": ["shop-guardrails", "pii-masking"], "workloads": {"serviceAccounts": ["api"]},
                       "proxy": {"ledger": {"secret": {"name": "dbguard-ledger", "key": "url"},
                                            "signingKeySecret": {"name": "dbguard-ledger-key"}}}}}
    kube.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(access))
    wait_ready(op, "dba", ns, "shop-api", "True", timeout=40)
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-1", "shop-api", service_account="api"))
    spec = op.get("pod", ns, "api-1")["spec"]
    sidecar = Kubelet(kube, ns, spec, spec["initContainers"][0], tmp_path / "sidecar")
    sidecar.start()
    try:
        with psycopg.connect(f"host=127.0.0.1 port={sidecar.port} dbname=app user=api sslmode=disable",
                             autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="approval request"):
                conn.execute("UPDATE customers SET balance = balance - 5 WHERE id = 2")
    finally:
        sidecar.stop()

    # 2 a.m.: who changed a customer balance? From the shared PostgreSQL ledger, both proxies' chains.
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    search = subprocess.run([sys.executable, "-m", "dbguard", "audit", "search", "--ledger", gateway.ledger_url,
                             "--table", "customers", "--column", "balance", "--op", "UPDATE",
                             "--since", started.strftime("%Y-%m-%d %H:%M"), "--until", until.strftime("%Y-%m-%d %H:%M"),
                             "--json"], capture_output=True, text=True, timeout=60)
    assert search.returncode == 0, search.stderr
    found = [json.loads(line) for line in search.stdout.splitlines() if line.strip()]
    who = {user for user in (f"system:serviceaccount:{ns}:reports", f"system:serviceaccount:{ns}:api")
           if any(user in json.dumps(e) for e in found)}
    assert len(who) == 2, found
    assert any("forwarded" in json.dumps(e) for e in found) and any("refused" in json.dumps(e) for e in found)
    # ... and which row the approved statement changed, from logical decoding (gateway.rowEvidence).
    changed = [c for e in found for c in e.get("row_changes") or ()]
    assert changed == [{"table": "public.customers", "op": "UPDATE", "key": {"id": "1"},
                        "old": {"balance": "100.00"}, "new": {"balance": "110.00"}}], found

    # The gateway's /metrics counted what happened (the dashboard's source).
    assert gateway.metric("dbguard_refusals_total", rule="no-drop-table") >= 1
    assert gateway.metric("dbguard_approval_requests_total") >= 1

    # Both chains verify, their checkpoints signed with the key from the Secret.
    gateway.stop()  # (its writer signs the tail as it closes)
    verify = subprocess.run([sys.executable, "-m", "dbguard", "audit", "verify", "--ledger", gateway.ledger_url,
                             "--public-key", str(tmp_path / "ledger.pub")], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "in 2 chain(s)" in verify.stdout, verify.stdout + verify.stderr
    assert "unsigned" not in verify.stdout, verify.stdout
    signed = int(verify.stdout.split(", ")[1].split()[0])
    assert signed >= 2, verify.stdout
