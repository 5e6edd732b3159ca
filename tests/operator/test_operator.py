"""The operator on a real API server: policies compiled and published, DatabaseAccess status and
RBAC, the sidecar injected by a real admission response, restarts, and webhook outages."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fix_kube import KubePlane
from tests.fix_operator import Operator
from tests.fix_postgres import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
POLICY = (ROOT / "examples" / "policy.yaml").read_text()
MASKING = (ROOT / "examples" / "masking.yaml").read_text()

BAD_REGO = """\
apiVersion: dbguard.io/v1alpha1
kind: GuardrailPolicy
metadata:
  name: broken
spec:
  rego: |
    package custom
    deny contains {"rule": "r", "reason": "x"} if {
      input.identity.user == "alice" &&& true
    }
"""


def access_doc(name: str, policies: list[str], secret: str = "shop-db", **extra: object) -> str:
    doc = {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": name},
           "spec": {"database": {"host": "db.example.internal", "name": "shop", "sslMode": "disable",
                                 "credentialsSecret": {"name": secret}},
                    "policies": policies, **extra}}
    return yaml.safe_dump(doc)


def pod_doc(name: str, access: str | None, service_account: str = "default", **annotations: str) -> str:
    meta: dict = {"name": name}
    if access is not None:
        meta["labels"] = {"dbguard.io/access": access}
    if annotations:
        meta["annotations"] = annotations
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "serviceAccountName": service_account,
        "containers": [{"name": "app", "image": "example/app:1", "env": [{"name": "DATABASE_URL",
                                                                          "value": "postgresql://direct"}]}]}})


def status_of(op: Operator, kind: str, ns: str, name: str) -> dict:
    return op.get(kind, ns, name).get("status") or {}


def ready(status: dict) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)


def wait_ready(op: Operator, kind: str, ns: str, name: str, value: str, timeout: float = 30) -> dict:
    def check() -> dict | None:
        status = status_of(op, kind, ns, name)
        cond = ready(status)
        return status if cond is not None and cond["status"] == value else None

    return wait_until(check, timeout=timeout, interval=0.3, what=f"{kind} {name} Ready={value}")


def secret(kube: KubePlane, ns: str, name: str = "shop-db", user: str = "app", password: str = "s3cret") -> None:
    kube.kubectl("-n", ns, "create", "secret", "generic", name, f"--from-literal=username={user}",
                 f"--from-literal=password={password}")


# -- GuardrailPolicy ----------------------------------------------------------------------------------


def test_policy_is_compiled_and_published(op: Operator, kube_ns: str) -> None:
    kube = op.kube
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=POLICY)
    status = wait_ready(op, "guardrailpolicy", kube_ns, "shop-guardrails", "True")
    assert status["observedGeneration"] == 1 and len(status["revision"]) == 12
    cm = json.loads(kube.kubectl("-n", kube_ns, "get", "configmap", "dbguard-policy-shop-guardrails",
                                 "-o", "json").stdout)
    assert cm["data"]["revision"] == status["revision"]
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "GuardrailPolicy"
    # The published document is what the proxy loads: same rules, same revision when compiled again.
    from dbguard.policy import compile as policy_compile
    from dbguard.policy import spec

    published = spec.load_text(cm["data"]["policy.yaml"], "cm")
    assert [r.name for r in published[0].rules] == [r.name for r in spec.load_text(POLICY, "x")[0].rules]
    assert policy_compile.compile_policies(published).revision == status["revision"]
    # Printer columns.
    table = kube.kubectl("-n", kube_ns, "get", "gp").stdout
    assert "deny" in table and status["revision"] in table and "True" in table

    # A spec change is a new generation and a new revision, published in place.
    kube.kubectl("-n", kube_ns, "patch", "gp", "shop-guardrails", "--type", "merge", "-p",
                 '{"spec":{"enforcementAction":"dryrun"}}')
    wait_until(lambda: status_of(op, "gp", kube_ns, "shop-guardrails").get("observedGeneration") == 2,
               timeout=30, interval=0.3, what="generation 2 reconciled")
    new = status_of(op, "gp", kube_ns, "shop-guardrails")
    assert new["revision"] != status["revision"]
    cm2 = json.loads(kube.kubectl("-n", kube_ns, "get", "cm", "dbguard-policy-shop-guardrails", "-o", "json").stdout)
    assert cm2["data"]["revision"] == new["revision"] and "dryrun" in cm2["data"]["policy.yaml"]


def test_bad_rego_reports_line_numbers_in_status(op: Operator, kube_ns: str) -> None:
    op.kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=BAD_REGO)
    status = wait_ready(op, "gp", kube_ns, "broken", "False")
    cond = ready(status)
    assert cond["reason"] == "RegoCompileError"
    assert "rego line 3" in cond["message"], cond["message"]
    assert status["errors"] and "broken" in status["errors"][0]
    assert op.kube.kubectl("-n", kube_ns, "get", "cm", "dbguard-policy-broken", check=False).returncode != 0


# -- DatabaseAccess -----------------------------------------------------------------------------------


def test_access_status_follows_secret_and_policies(op: Operator, kube_ns: str) -> None:
    kube = op.kube
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=access_doc("shop-api", ["shop-guardrails"]))
    status = wait_ready(op, "databaseaccess", kube_ns, "shop-api", "False")
    assert ready(status)["reason"] == "SecretNotFound"
    secret(kube, kube_ns)
    status = wait_ready(op, "dba", kube_ns, "shop-api", "False", timeout=40)
    wait_until(lambda: ready(status_of(op, "dba", kube_ns, "shop-api"))["reason"] == "PolicyNotFound", timeout=40,
               interval=0.5, what="PolicyNotFound")
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=POLICY)
    status = wait_ready(op, "dba", kube_ns, "shop-api", "True", timeout=40)
    assert status["ready"] is True and status["policyRevision"] and status["injectedPods"] == 0
    # Workloads may verify their tokens: the operator bound the TokenReview role for this namespace.
    crb = json.loads(kube.kubectl("get", "clusterrolebinding", f"dbguard-tokenreview-{kube_ns}-shop-api",
                                  "-o", "json").stdout)
    assert crb["subjects"] == [{"kind": "Group", "name": f"system:serviceaccounts:{kube_ns}",
                                "apiGroup": "rbac.authorization.k8s.io"}]
    can = kube.kubectl("auth", "can-i", "create", "tokenreviews",
                       f"--as=system:serviceaccount:{kube_ns}:api", f"--as-group=system:serviceaccounts:{kube_ns}",
                       check=False)
    assert can.stdout.strip() == "yes"
    # Deleting the access releases the binding (the finalizer's job), then the access goes.
    kube.kubectl("-n", kube_ns, "delete", "dba", "shop-api", "--timeout=30s")
    assert kube.kubectl("get", "clusterrolebinding", f"dbguard-tokenreview-{kube_ns}-shop-api",
                        check=False).returncode != 0


def test_access_is_ready_only_when_its_ledger_secrets_would_start_the_sidecar(op: Operator, kube_ns: str,
                                                                              tmp_path) -> None:
    """A Secret the sidecar mounts but that is missing would leave its pods unable to start, and a
    signing key that is not an Ed25519 private key would stop the proxy at start: both show in the
    status before any pod is made."""
    kube = op.kube
    secret(kube, kube_ns)
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=POLICY)
    ledger = {"secret": {"name": "audit-ledger"}, "signingKeySecret": {"name": "audit-key"}}
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=access_doc("shop-api", ["shop-guardrails"],
                                                                     proxy={"ledger": ledger}))

    def cond() -> dict:
        return ready(status_of(op, "dba", kube_ns, "shop-api")) or {"reason": "", "message": ""}

    def reason() -> str:
        return cond()["reason"]

    wait_until(lambda: reason() == "SecretNotFound", timeout=40, interval=0.3, what="SecretNotFound")
    assert "'audit-ledger'" in cond()["message"]
    kube.kubectl("-n", kube_ns, "create", "secret", "generic", "audit-ledger", "--from-literal=uri=postgresql://l/l")
    wait_until(lambda: "has no key(s) ['url']" in cond()["message"],
               timeout=40, interval=0.3, what="the ledger Secret's missing key")
    kube.kubectl("-n", kube_ns, "delete", "secret", "audit-ledger")
    kube.kubectl("-n", kube_ns, "create", "secret", "generic", "audit-ledger", "--from-literal=url=postgresql://l/l")
    wait_until(lambda: "'audit-key'" in cond()["message"], timeout=40,
               interval=0.3, what="the signing key Secret to be missing")
    kube.kubectl("-n", kube_ns, "create", "secret", "generic", "audit-key", "--from-literal=ledger.key=not a key")
    wait_until(lambda: reason() == "SecretInvalid", timeout=40, interval=0.3, what="SecretInvalid")
    assert "not an unencrypted Ed25519 private key" in cond()["message"]
    private = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
    (tmp_path / "ledger.key").write_bytes(private)
    kube.kubectl("-n", kube_ns, "delete", "secret", "audit-key")
    kube.kubectl("-n", kube_ns, "create", "secret", "generic", "audit-key", f"--from-file=ledger.key={tmp_path / 'ledger.key'}")
    wait_ready(op, "dba", kube_ns, "shop-api", "True", timeout=40)


@pytest.fixture
def ready_access(op: Operator, kube_ns: str) -> str:
    kube = op.kube
    secret(kube, kube_ns)
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=POLICY)
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=MASKING)
    kube.kubectl("-n", kube_ns, "apply", "-f", "-",
                 input=access_doc("shop-api", ["shop-guardrails", "pii-masking"],
                                  workloads={"serviceAccounts": ["api"]}))
    wait_ready(op, "dba", kube_ns, "shop-api", "True", timeout=40)
    return kube_ns


def test_labelled_pod_comes_back_with_the_sidecar(op: Operator, ready_access: str) -> None:
    kube, ns = op.kube, ready_access
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-1", "shop-api", service_account="api"))
    pod = op.get("pod", ns, "api-1")
    init = pod["spec"]["initContainers"]
    sidecar = init[0]
    assert sidecar["name"] == "dbguard-proxy" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "dbguard:test"
    args = sidecar["args"]
    assert args[0] == "proxy" and "--workload-token-file" in args
    assert args.count("--policy") == 2 and "/etc/dbguard/policies/pii-masking/policy.yaml" in args
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    revision = status_of(op, "dba", ns, "shop-api")["policyRevision"]
    assert pod["metadata"]["annotations"]["dbguard.io/injected"] == revision
    # The app talks to localhost; the real credentials are mounted into the sidecar only.
    app = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["DATABASE_URL"] == "postgresql://api@127.0.0.1:6432/shop?sslmode=disable"
    assert env["PGHOST"] == "127.0.0.1" and env["PGPORT"] == "6432"
    assert not app.get("volumeMounts")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dbguard-database"]["secret"]["secretName"] == "shop-db"
    token = volumes["dbguard-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "dbguard"
    mounted = {m["name"] for m in sidecar["volumeMounts"]}
    assert {"dbguard-database", "dbguard-token", "dbguard-policy-shop-guardrails"} <= mounted
    wait_until(lambda: status_of(op, "dba", ns, "shop-api").get("injectedPods") == 1, timeout=30, interval=0.5,
               what="injectedPods == 1")


def test_pods_the_access_does_not_admit_are_refused(op: Operator, ready_access: str) -> None:
    kube, ns = op.kube, ready_access
    wrong_sa = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("x-1", "shop-api", "batch"), check=False)
    assert wrong_sa.returncode != 0 and "admits the ServiceAccounts ['api']" in wrong_sa.stderr
    unknown = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("x-2", "no-such-access", "api"), check=False)
    assert unknown.returncode != 0 and "DatabaseAccess 'no-such-access'" in unknown.stderr
    plain = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("plain", None))
    assert plain.returncode == 0
    assert "initContainers" not in op.get("pod", ns, "plain")["spec"]


def test_operator_down_blocks_only_pods_that_ask_for_it(op: Operator, ready_access: str) -> None:
    kube, ns = op.kube, ready_access
    op.stop()
    plain = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("plain", None), check=False)
    assert plain.returncode == 0, plain.stderr
    governed = kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-2", "shop-api", "api"), check=False)
    assert governed.returncode != 0 and "inject-sidecar.dbguard.io" in governed.stderr
    op.start()
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-2", "shop-api", "api"))
    assert op.get("pod", ns, "api-2")["spec"]["initContainers"][0]["name"] == "dbguard-proxy"


def test_changes_made_while_the_operator_is_down_are_reconciled_on_restart(op: Operator, kube_ns: str) -> None:
    kube = op.kube
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=POLICY)
    first = wait_ready(op, "gp", kube_ns, "shop-guardrails", "True")
    op.stop()
    kube.kubectl("-n", kube_ns, "patch", "gp", "shop-guardrails", "--type", "merge", "-p",
                 '{"spec":{"defaultAction":"deny"}}')
    kube.kubectl("-n", kube_ns, "apply", "-f", "-", input=BAD_REGO)
    op.start()
    wait_until(lambda: status_of(op, "gp", kube_ns, "shop-guardrails").get("observedGeneration") == 2,
               timeout=40, interval=0.3, what="the change made while down to be reconciled")
    second = status_of(op, "gp", kube_ns, "shop-guardrails")
    assert second["revision"] != first["revision"]
    wait_ready(op, "gp", kube_ns, "broken", "False")
    # Restarting again changes nothing: same revision, one ConfigMap, no new generation of work.
    op.stop()
    op.start()
    cms = kube.kubectl("-n", kube_ns, "get", "cm", "-l", "app.kubernetes.io/managed-by=dbguard", "-o", "name").stdout
    assert cms.split() == ["configmap/dbguard-policy-shop-guardrails"]
    assert status_of(op, "gp", kube_ns, "shop-guardrails")["revision"] == second["revision"]


def _pod_with(name: str, containers: list[dict]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "labels": {"dbguard.io/access": "shop-api"}}, "spec": {
        "serviceAccountName": "api", "containers": containers}})


@pytest.mark.parametrize(("containers", "message"), [
    ([{"name": "app", "image": "x", "volumeMounts": [{"name": "dbguard-database", "mountPath": "/creds"}]}],
     "volumes named 'dbguard-*' are the sidecar's alone"),
    ([{"name": "app", "image": "x"}, {"name": "dbguard-proxy", "image": "busybox"}],
     "container name 'dbguard-proxy' is reserved"),
])
def test_the_app_cannot_reach_the_sidecars_credentials_or_pose_as_it(op: Operator, ready_access: str,
                                                                       containers: list, message: str) -> None:
    r = op.kube.kubectl("-n", ready_access, "create", "-f", "-", input=_pod_with("sneak", containers), check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_ephemeral_containers_cannot_mount_the_sidecars_credentials(op: Operator, ready_access: str) -> None:
    kube, ns = op.kube, ready_access
    kube.kubectl("-n", ns, "create", "-f", "-", input=pod_doc("api-9", "shop-api", service_account="api"))
    pod = op.get("pod", ns, "api-9")

    def add(name: str, mounts: list[dict]) -> subprocess.CompletedProcess:
        body = {**pod, "spec": {**pod["spec"], "ephemeralContainers": [
            {"name": name, "image": "busybox", "volumeMounts": mounts}]}}
        return kube.kubectl("replace", "--raw", f"/api/v1/namespaces/{ns}/pods/api-9/ephemeralcontainers",
                            "-f", "-", input=json.dumps(body), check=False)

    sneak = add("debug", [{"name": "dbguard-database", "mountPath": "/creds"}])
    assert sneak.returncode != 0 and "are the sidecar's alone" in sneak.stderr, sneak.stderr
    assert add("debug", []).returncode == 0  # debugging without the credentials is the cluster's business
