"""dbguard end to end on a real cluster (kind, via e2e/run.sh): the chart's operator running as a pod,
its webhooks behind their Service, a PostgreSQL pod and a PostgreSQL ledger pod, and an app pod that
gets the proxy as a native sidecar, whose statements are decided by the policies: a DROP refused, PII
masked, a balance UPDATE held until approved with `kubectl patch` and then run once, the 2 a.m.
question answered by `dbguard audit search` from the shared ledger; then the chart's gateway for
people and agents who log in with a Kubernetes token.

Not collected by `pytest` at the repository root (testpaths = tests). Runs against the current
kubectl context; e2e/run.sh sets it up. Environment: DBGUARD_E2E_IMAGE (the image the chart was
installed with), DBGUARD_E2E_POSTGRES_IMAGE, DBGUARD_E2E_NAMESPACE (dbguard-system). Each step and
the test in tests/ that covers it against a real API server: e2e/README.md.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import time
import uuid

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPERATOR_NS = os.environ.get("DBGUARD_E2E_NAMESPACE", "dbguard-system")
IMAGE = os.environ.get("DBGUARD_E2E_IMAGE", "ghcr.io/dbguard/dbguard:e2e")
POSTGRES_IMAGE = os.environ.get("DBGUARD_E2E_POSTGRES_IMAGE", "postgres:16-alpine")
DB_PASSWORD = "e2e-" + uuid.uuid4().hex[:12]
LEDGER_PASSWORD = "ledger-" + uuid.uuid4().hex[:12]
RELEASE = "dbguard"
CHART = ROOT / "charts" / "dbguard"
STARTED = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)


def kubectl(*args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def get(kind: str, name: str, namespace: str | None = None) -> dict:
    ns = ["-n", namespace] if namespace else []
    return json.loads(kubectl(*ns, "get", kind, name, "-o", "json").stdout)


def wait_until(predicate, timeout: float = 60, interval: float = 1, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def ready_condition(obj: dict) -> str:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), "")


def wait_ready(kind: str, name: str, namespace: str, timeout: float = 60) -> dict:
    def check() -> dict | None:
        obj = get(kind, name, namespace)
        return obj if ready_condition(obj) == "True" else None

    return wait_until(check, timeout=timeout, what=f"{kind} {namespace}/{name} Ready")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if subprocess.run(["kubectl", "version", "--request-timeout=5s"], capture_output=True).returncode != 0:
        pytest.fail("no cluster in the current kubectl context: run e2e/run.sh (see e2e/README.md)")


def new_namespace(prefix: str, **labels: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    if labels:
        kubectl("label", "namespace", name, *[f"{k}={v}" for k, v in labels.items()])
    return name


@pytest.fixture
def namespace() -> str:
    name = new_namespace("e2e")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


# -- the operator -------------------------------------------------------------------------------------


def test_operator_is_available_behind_its_webhook_service() -> None:
    kubectl("-n", OPERATOR_NS, "rollout", "status", "deployment/dbguard-operator", "--timeout=120s")
    deploy = get("deployment", "dbguard-operator", OPERATOR_NS)
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    mutating = get("mutatingwebhookconfiguration", "dbguard")
    for hook in mutating["webhooks"]:
        assert hook["clientConfig"]["service"] == {"namespace": OPERATOR_NS, "name": "dbguard-webhook",
                                                   "port": 443, "path": hook["clientConfig"]["service"]["path"]}
        assert hook["clientConfig"]["caBundle"]
    inject = next(h for h in mutating["webhooks"] if h["name"] == "inject-sidecar.dbguard.io")
    assert inject["failurePolicy"] == "Fail"
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
            "values": ["kube-system", "kube-public", "kube-node-lease", OPERATOR_NS]} in \
        inject["namespaceSelector"]["matchExpressions"]


def test_policy_is_compiled_and_published(namespace: str) -> None:
    kubectl("-n", namespace, "apply", "-f", str(ROOT / "examples" / "policy.yaml"))
    policy = wait_ready("guardrailpolicy", "shop-guardrails", namespace)
    cm = get("configmap", "dbguard-policy-shop-guardrails", namespace)
    assert cm["data"]["revision"] == policy["status"]["revision"]


# -- a database, an access, an app pod with the sidecar ---------------------------------------------------


def postgres_pod(name: str, user: str, db: str, password: str, schema_configmap: str | None = None) -> list[dict]:
    """A PostgreSQL pod and its Service (the governed database, or the ledger apart from it)."""
    container = {
        "name": "postgres", "image": POSTGRES_IMAGE, "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "POSTGRES_USER", "value": user}, {"name": "POSTGRES_DB", "value": db},
                {"name": "POSTGRES_PASSWORD", "value": password}],
        "ports": [{"containerPort": 5432}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1", "-U", user, "-d", db]},
                           "periodSeconds": 2}}
    spec: dict = {"containers": [container]}
    if schema_configmap:
        container["volumeMounts"] = [{"name": "schema", "mountPath": "/docker-entrypoint-initdb.d"}]
        spec["volumes"] = [{"name": "schema", "configMap": {"name": schema_configmap}}]
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
             "spec": {"selector": {"app": name}, "ports": [{"port": 5432, "targetPort": 5432}]}}]


def ledger_url(ns: str) -> str:
    return f"postgresql://ledger:{LEDGER_PASSWORD}@ledger-db.{ns}.svc.cluster.local:5432/ledger?sslmode=disable"


def shop_manifests(ns: str) -> str:
    schema = (ROOT / "examples" / "demo-schema.sql").read_text()
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-schema"},
         "data": {"demo-schema.sql": schema}},
        *postgres_pod("shop-db", "shop_api", "shop", DB_PASSWORD, schema_configmap="demo-schema"),
        *postgres_pod("ledger-db", "ledger", "ledger", LEDGER_PASSWORD),
        # The shared audit ledger's URL, where the DatabaseAccess (and the gateway) look for it.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dbguard-ledger"},
         "stringData": {"url": ledger_url(ns)}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db-credentials"},
         "stringData": {"username": "shop_api", "password": DB_PASSWORD}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "api"}},
        {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": "shop-api"},
         "spec": {"database": {"host": f"shop-db.{ns}.svc.cluster.local", "port": 5432, "name": "shop",
                               "sslMode": "disable", "credentialsSecret": {"name": "shop-db-credentials"}},
                  "policies": ["shop-guardrails", "pii-masking"], "workloads": {"serviceAccounts": ["api"]},
                  "proxy": {"ledger": {"secret": {"name": "dbguard-ledger", "key": "url"}}}}},
    ]
    return yaml.safe_dump_all(docs)


def app_pod(name: str, labelled: bool = True) -> str:
    meta: dict = {"name": name}
    if labelled:
        meta["labels"] = {"dbguard.io/access": "shop-api"}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "serviceAccountName": "api",
        "containers": [{"name": "app", "image": POSTGRES_IMAGE, "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "infinity"]}]}})


@pytest.fixture(scope="module")
def shop() -> str:
    ns = new_namespace("e2e-shop")
    try:
        kubectl("-n", ns, "apply", "-f", str(ROOT / "examples" / "policy.yaml"),
                "-f", str(ROOT / "examples" / "masking.yaml"))
        wait_ready("guardrailpolicy", "shop-guardrails", ns)
        wait_ready("guardrailpolicy", "pii-masking", ns)
        kubectl("-n", ns, "apply", "-f", "-", input=shop_manifests(ns))
        kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/shop-db", "pod/ledger-db", "--timeout=180s")
        wait_ready("databaseaccess", "shop-api", ns)
        kubectl("-n", ns, "create", "-f", "-", input=app_pod("app"))
        kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/app", "--timeout=180s")
        yield ns
    finally:
        if os.environ.get("KEEP") != "1":
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def psql(ns: str, sql: str, target: str = '"$DATABASE_URL"', password: str = "") -> subprocess.CompletedProcess[str]:
    """psql in the app container, to $DATABASE_URL (the sidecar on 127.0.0.1) unless told otherwise,
    errors with their SQLSTATE; -A -t: unaligned rows, no headers."""
    env = f"PGPASSWORD='{password}' " if password else ""
    script = f'{env}psql {target} -X -A -t -v VERBOSITY=verbose -v ON_ERROR_STOP=0 -c "{sql}"'
    return kubectl("-n", ns, "exec", "app", "-c", "app", "--", "sh", "-c", script, check=False)


def test_labelled_pod_gets_the_proxy_as_a_native_sidecar(shop: str) -> None:
    pod = get("pod", "app", shop)
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "dbguard-proxy" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    status = next(s for s in pod["status"]["initContainerStatuses"] if s["name"] == "dbguard-proxy")
    assert status["ready"] is True
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["DATABASE_URL"].startswith("postgresql://api@127.0.0.1:6432/shop")
    wait_until(lambda: get("databaseaccess", "shop-api", shop)["status"].get("injectedPods") == 1, timeout=40,
               what="injectedPods == 1")


def test_statements_are_decided_by_the_policy(shop: str) -> None:
    ok = psql(shop, "SELECT count(*) FROM customers")
    assert ok.returncode == 0 and ok.stdout.strip() == "2", ok.stderr
    refused = psql(shop, "DELETE FROM orders")
    assert "42501" in refused.stderr and "no-unfiltered-writes" in refused.stderr, refused.stderr
    # The refusal left the rows alone, and the client's next statement works.
    after = psql(shop, "SELECT count(*) FROM orders")
    assert after.returncode == 0 and after.stdout.strip() == "3", after.stderr


def test_drop_table_is_refused(shop: str) -> None:
    refused = psql(shop, "DROP TABLE customers")
    assert "42501" in refused.stderr and "no-drop-table" in refused.stderr, refused.stderr
    assert psql(shop, "SELECT count(*) FROM customers").stdout.strip() == "2"


def test_pii_is_masked_for_the_workload(shop: str) -> None:
    rows = psql(shop, "SELECT name, email, ssn FROM customers ORDER BY id")
    assert rows.returncode == 0, rows.stderr
    assert rows.stdout.split() == ["Ada|****@example.com|****", "Grace|****@example.com|****"], rows.stdout


def test_a_held_statement_runs_once_approved(shop: str) -> None:
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "e2e-approver"},
         "rules": [{"apiGroups": ["dbguard.io"], "resources": ["approvalrequests"], "verbs": ["get", "list", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "e2e-approver"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "e2e-approver"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]}]))
    statement = "UPDATE customers SET balance = balance + 1 WHERE id = 1"
    held = psql(shop, statement)
    assert "balance-change-needs-approval" in held.stderr, held.stderr

    def pending() -> str | None:
        items = json.loads(kubectl("-n", shop, "get", "approvalrequests", "-o", "json").stdout)["items"]
        return next((i["metadata"]["name"] for i in items if i["spec"]["statement"] == statement
                     and (i.get("status") or {}).get("phase") == "Pending"), None)

    name = wait_until(pending, timeout=30, what="a Pending ApprovalRequest")
    assert name in held.stderr
    # alice, a DBA (impersonated: the webhook stamps the API server's user info, never the body's).
    kubectl("-n", shop, "patch", "approvalrequest", name, "--type", "merge", "--as=alice", "--as-group=dba",
            "-p", '{"spec":{"decision":"Approved","reason":"e2e"}}')
    wait_until(lambda: get("approvalrequest", name, shop)["status"].get("phase") == "Approved", timeout=30,
               what="phase Approved")
    ran = psql(shop, statement)
    assert ran.returncode == 0 and "UPDATE 1" in ran.stdout, ran.stderr
    wait_until(lambda: get("approvalrequest", name, shop)["status"].get("phase") == "Executed", timeout=30,
               what="phase Executed")
    # Once: the same statement again needs a new approval.
    again = psql(shop, statement)
    assert "balance-change-needs-approval" in again.stderr, again.stderr


def test_who_changed_a_balance_is_answered_from_the_ledger(shop: str) -> None:
    """The 2 a.m. question, asked of the shared PostgreSQL ledger by `dbguard audit search` in a pod."""
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    args = ["audit", "search", "--ledger", "$(DBGUARD_LEDGER_URL)", "--table", "customers", "--column", "balance",
            "--op", "UPDATE", "--since", STARTED.strftime("%Y-%m-%d %H:%M"),
            "--until", until.strftime("%Y-%m-%d %H:%M"), "--json"]
    kubectl("-n", shop, "create", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "auditor"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "audit", "image": IMAGE, "imagePullPolicy": "IfNotPresent", "args": args,
            "env": [{"name": "DBGUARD_LEDGER_URL",
                     "valueFrom": {"secretKeyRef": {"name": "dbguard-ledger", "key": "url"}}}]}]}}))

    def finished() -> str | None:
        phase = get("pod", "auditor", shop)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, timeout=120, what="the audit search")
    out = kubectl("-n", shop, "logs", "auditor").stdout
    assert phase == "Succeeded", out
    entries = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    text = json.dumps(entries)
    # The approved UPDATE that ran, and the refusals before it, all by the app's ServiceAccount.
    assert entries and f"system:serviceaccount:{shop}:api" in text, out
    assert "forwarded" in text and "refused" in text, out


def test_people_and_agents_reach_the_database_through_the_gateway(shop: str, tmp_path: pathlib.Path) -> None:
    """The chart's gateway (gateway.enabled) in the shop namespace: a ServiceAccount's Kubernetes token as
    the password, over TLS; the same policies (DROP refused, PII masked) and the same ledger."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    host = f"dbguard-gateway.{shop}.svc"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    kubectl("-n", shop, "create", "secret", "tls", "gateway-tls", f"--cert={tmp_path / 'tls.crt'}",
            f"--key={tmp_path / 'tls.key'}")
    kubectl("-n", shop, "create", "serviceaccount", "reports")
    gateway = ["--set", "gateway.enabled=true", "--set", f"gateway.namespace={shop}", "--set", "gateway.replicas=1",
               "--set", f"gateway.database.host=shop-db.{shop}.svc.cluster.local", "--set", "gateway.database.name=shop",
               "--set", "gateway.database.sslMode=disable",
               "--set", "gateway.database.credentialsSecret.name=shop-db-credentials",
               "--set", "gateway.policies={shop-guardrails,pii-masking}", "--set", "gateway.tls.secretName=gateway-tls",
               "--set", "gateway.ledger.secret.name=dbguard-ledger"]
    helm("upgrade", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--reuse-values", *gateway, "--wait",
         "--timeout", "4m")
    try:
        kubectl("-n", shop, "rollout", "status", "deployment/dbguard-gateway", "--timeout=120s")
        token = kubectl("-n", shop, "create", "token", "reports", "--audience", "dbguard").stdout.strip()
        target = f'"host={host} port=5432 dbname=shop user={shop}:reports sslmode=require"'
        rows = psql(shop, "SELECT name, email FROM customers ORDER BY id", target=target, password=token)
        assert rows.stdout.split() == ["Ada|****@example.com", "Grace|****@example.com"], rows.stderr
        refused = psql(shop, "DROP TABLE customers", target=target, password=token)
        assert "42501" in refused.stderr and "no-drop-table" in refused.stderr, refused.stderr
        wrong = psql(shop, "SELECT 1", target=target, password=token[:-4] + "AAAA")
        assert wrong.returncode != 0 and "token authentication failed" in wrong.stderr, wrong.stderr
    finally:
        helm("upgrade", RELEASE, str(CHART), "--namespace", OPERATOR_NS, "--reuse-values",
             "--set", "gateway.enabled=false", "--wait", "--timeout", "2m")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def test_pods_that_do_not_ask_and_opted_out_namespaces_are_untouched(shop: str) -> None:
    kubectl("-n", shop, "create", "-f", "-", input=app_pod("plain", labelled=False))
    assert not get("pod", "plain", shop)["spec"].get("initContainers")
    opted_out = new_namespace("e2e-optout", **{"dbguard.io/injection": "disabled"})
    try:
        kubectl("-n", opted_out, "create", "serviceaccount", "api")
        kubectl("-n", opted_out, "create", "-f", "-", input=app_pod("app"))
        assert not get("pod", "app", opted_out)["spec"].get("initContainers")
    finally:
        kubectl("delete", "namespace", opted_out, "--wait=false", check=False)
