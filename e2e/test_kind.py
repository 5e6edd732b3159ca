"""dbguard end to end on a real cluster (kind, via e2e/run.sh): the chart's operator running as a pod,
its webhooks behind their Service, a PostgreSQL pod, and an app pod that gets the proxy as a native
sidecar, whose statements are decided by the policy, and whose held statement runs once approved.

Not collected by `pytest` at the repository root (testpaths = tests). Runs against the current
kubectl context; e2e/run.sh sets it up. Environment: DBGUARD_E2E_IMAGE (the image the chart was
installed with), DBGUARD_E2E_POSTGRES_IMAGE, DBGUARD_E2E_NAMESPACE (dbguard-system).
"""

from __future__ import annotations

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


def shop_manifests(ns: str) -> str:
    schema = (ROOT / "examples" / "demo-schema.sql").read_text()
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-schema"},
         "data": {"demo-schema.sql": schema}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shop-db", "labels": {"app": "shop-db"}},
         "spec": {"containers": [{
             "name": "postgres", "image": POSTGRES_IMAGE, "imagePullPolicy": "IfNotPresent",
             "env": [{"name": "POSTGRES_USER", "value": "shop_api"}, {"name": "POSTGRES_DB", "value": "shop"},
                     {"name": "POSTGRES_PASSWORD", "value": DB_PASSWORD}],
             "ports": [{"containerPort": 5432}],
             "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1", "-U", "shop_api", "-d", "shop"]},
                                "periodSeconds": 2},
             "volumeMounts": [{"name": "schema", "mountPath": "/docker-entrypoint-initdb.d"}]}],
             "volumes": [{"name": "schema", "configMap": {"name": "demo-schema"}}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop-db"},
         "spec": {"selector": {"app": "shop-db"}, "ports": [{"port": 5432, "targetPort": 5432}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db-credentials"},
         "stringData": {"username": "shop_api", "password": DB_PASSWORD}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "api"}},
        {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": "shop-api"},
         "spec": {"database": {"host": f"shop-db.{ns}.svc.cluster.local", "port": 5432, "name": "shop",
                               "sslMode": "disable", "credentialsSecret": {"name": "shop-db-credentials"}},
                  "policies": ["shop-guardrails"], "workloads": {"serviceAccounts": ["api"]}}},
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
        kubectl("-n", ns, "apply", "-f", str(ROOT / "examples" / "policy.yaml"))
        wait_ready("guardrailpolicy", "shop-guardrails", ns)
        kubectl("-n", ns, "apply", "-f", "-", input=shop_manifests(ns))
        kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/shop-db", "--timeout=180s")
        wait_ready("databaseaccess", "shop-api", ns)
        kubectl("-n", ns, "create", "-f", "-", input=app_pod("app"))
        kubectl("-n", ns, "wait", "--for=condition=Ready", "pod/app", "--timeout=180s")
        yield ns
    finally:
        if os.environ.get("KEEP") != "1":
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def psql(ns: str, sql: str) -> subprocess.CompletedProcess[str]:
    """psql in the app container, to $DATABASE_URL (the sidecar on 127.0.0.1), errors with SQLSTATE."""
    script = f'psql "$DATABASE_URL" -X -v VERBOSITY=verbose -v ON_ERROR_STOP=0 -c "{sql}"'
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
    assert ok.returncode == 0 and " 2" in ok.stdout, ok.stderr
    refused = psql(shop, "DELETE FROM orders")
    assert "42501" in refused.stderr and "no-unfiltered-writes" in refused.stderr, refused.stderr
    # The refusal left the rows alone, and the client's next statement works.
    after = psql(shop, "SELECT count(*) FROM orders")
    assert after.returncode == 0 and " 3" in after.stdout, after.stderr


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
