"""The Helm chart, rendered by the real helm: lint, the operator's pod (flags the operator really
has, probes, a restricted security context), least-privilege RBAC rule by rule, the certManager,
OPA, governed-namespaces, ledger and metrics variants, and CRDs identical to crds/."""

from __future__ import annotations

import argparse
import filecmp
import json
import pathlib
import re
import shlex
import subprocess
import urllib.request

import pytest
import yaml

from tests.chart.conftest import CHART, NAMESPACE, ROOT, Helm, Manifests, sets
from tests.fix_kube import tools_bin
from tests.fix_postgres import free_port, wait_until

CERT_MANAGER = ["--api-versions", "cert-manager.io/v1", *sets(webhook__certs__mode="certManager")]
PROMETHEUS_OPERATOR = ["--api-versions", "monitoring.coreos.com/v1"]
# The smallest gateway: a database, its credentials, a policy, a TLS Secret.
GATEWAY = ["--set", "gateway.enabled=true", "--set", "gateway.database.host=db.shop.svc",
           "--set", "gateway.database.name=shop", "--set", "gateway.database.credentialsSecret.name=shop-db",
           "--set", "gateway.policies={shop-guardrails,pii-masking}", "--set", "gateway.tls.secretName=gateway-tls"]


def operator_container(m: Manifests) -> dict:
    deploy = m.one("Deployment", "dbguard-operator")
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    return container


def parse_operator_args(args: list[str]) -> argparse.Namespace:
    """The rendered args, parsed by the operator's own command line (a renamed flag fails here)."""
    from dbguard.controller import cli

    assert args[0] == "operator"
    parser = argparse.ArgumentParser(prog="dbguard operator", exit_on_error=False)
    cli.add_arguments(parser)
    return parser.parse_args(args[1:])


def rule_set(rules: list[dict]) -> set[tuple[str, str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb, resourceName or '*') tuples, for exact comparisons."""
    out = set()
    for r in rules:
        for group in r.get("apiGroups", []):
            for resource in r.get("resources", []):
                for verb in r["verbs"]:
                    for name in r.get("resourceNames") or ["*"]:
                        out.add((group, resource, verb, name))
    return out


# What the operator calls (operator/dbguard/controller/*.py) and kopf needs, in governed namespaces ...
NAMESPACED = {
    *{("dbguard.io", kind, verb, "*") for kind in ("guardrailpolicies", "databaseaccesses", "approvalrequests")
      for verb in ("get", "list", "watch", "patch")},
    *{("dbguard.io", f"{kind}/status", "patch", "*")
      for kind in ("guardrailpolicies", "databaseaccesses", "approvalrequests")},
    ("", "configmaps", "get", "*"), ("", "configmaps", "create", "*"), ("", "configmaps", "update", "*"),
    ("", "secrets", "get", "*"),
    ("", "pods", "list", "*"),
    ("", "events", "create", "*"),
    # dbguard-approval-requester Role + RoleBinding per DatabaseAccess (access.ensure_requester_rbac) ...
    ("rbac.authorization.k8s.io", "roles", "create", "*"),
    ("rbac.authorization.k8s.io", "roles", "update", "dbguard-approval-requester"),
    ("rbac.authorization.k8s.io", "roles", "bind", "dbguard-approval-requester"),
    ("rbac.authorization.k8s.io", "rolebindings", "create", "*"),
    ("rbac.authorization.k8s.io", "rolebindings", "update", "*"),
    # ... and, for the escalation check, what that Role grants.
    ("dbguard.io", "approvalrequests", "create", "*"),
    ("dbguard.io", "approvalrequests/status", "get", "*"), ("dbguard.io", "approvalrequests/status", "update", "*"),
}
# ... and cluster-wide.
CLUSTER = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list", "*"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch", "*"),
    *{("admissionregistration.k8s.io", kind, verb, name)
      for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")
      for verb, name in (("create", "*"), ("get", "dbguard"), ("update", "dbguard"), ("delete", "dbguard"))},
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create", "*"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "update", "*"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "delete", "*"),
    ("rbac.authorization.k8s.io", "clusterroles", "bind", "dbguard-tokenreview"),
    ("rbac.authorization.k8s.io", "clusterroles", "create", "*"),
    ("authentication.k8s.io", "tokenreviews", "create", "*"),
}
WEBHOOK_TLS = {("", "secrets", "create", "*"), ("", "secrets", "get", "dbguard-webhook-tls"),
               ("", "secrets", "update", "dbguard-webhook-tls")}


@pytest.fixture(scope="module")
def default(helm: Helm) -> Manifests:
    return helm.render()


# -- lint and schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    [],
    sets(opa__enabled="true", cleanupOnUninstall="false"),
    ["--set", "namespaces={shop,billing}", "--set", "ledger.secret.create=true", "--set", "ledger.url=postgresql://l/l",
     "--set", "ledger.namespaces={shop}"],
    [*GATEWAY, *sets(gateway__namespace="shop", gateway__ledger__secret__name="dbguard-ledger",
                     metrics__grafanaDashboard__enabled="true")],
], ids=["default", "opa", "namespaces+ledger", "gateway+dashboard"])
def test_chart_lints_strictly(helm: Helm, variant: list[str]) -> None:
    # (helm lint cannot be told about cert-manager or prometheus-operator APIs: those variants are
    # rendered below with --api-versions, and refused without them.)
    r = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *variant)
    assert "0 chart(s) failed" in r.stdout, r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (sets(imageTag="x"), "additional properties 'imageTag' not allowed"),
    (sets(image__tag="latest"), "/image/tag"),
    (sets(opa__image__tag="latest"), "/opa/image/tag"),
    (sets(webhook__certs__mode="selfSigned"), "/webhook/certs/mode"),
    (["--set", "namespaces={Not_A_Namespace}"], "/namespaces/0"),
    (sets(webhook__certs__mode="certManager"), "needs cert-manager"),
    (sets(ledger__secret__create="true"), "ledger.url"),
    (sets(ledger__secret__create="true", ledger__url="mysql://x"), "/ledger/url"),
    (sets(metrics__podMonitor__enabled="true"), "prometheus-operator"),
    (["--kube-version", "1.28.0"], "kubeVersion"),
    (sets(metrics__serviceMonitor__enabled="true"), "prometheus-operator"),
    (sets(metrics__operator__port="0"), "/metrics/operator/port"),
    (sets(operator__podDisruptionBudget__maxUnavailable="lots"), "/operator/podDisruptionBudget/maxUnavailable"),
    (sets(operator__podDisruptionBudget__minAvailable="1"), "set one of maxUnavailable and minAvailable"),
    (sets(gateway__enabled="true"), "/gateway/database/host"),
    (sets(gateway__enabled="true", gateway__database__host="db", gateway__database__name="shop",
          gateway__database__credentialsSecret__name="s"), "/gateway/policies"),
    ([*GATEWAY, *sets(gateway__tls__secretName="")], "gateway.tls.secretName"),
    ([*GATEWAY, *sets(gateway__auth__mode="ldap")], "/gateway/auth/mode"),
    ([*GATEWAY, *sets(gateway__auth__mode="oidc")], "gateway.auth.oidc.issuer"),
    ([*GATEWAY, *sets(gateway__auth__mode="tokens")], "gateway.auth.tokens.secretName"),
    ([*GATEWAY, *sets(gateway__database__sslMode="on")], "/gateway/database/sslMode"),
    ([*GATEWAY, "--set", "gateway.policies={Shop_Policy}"], "/gateway/policies/0"),
    ([*GATEWAY, "--set", "namespaces={shop}"], "is not governed"),
    ([*GATEWAY, *sets(gateway__ledger__signingKeySecret__name="k")], "set gateway.ledger.secret.name"),
], ids=["unknown-key", "latest-tag", "latest-opa-tag", "cert-mode", "namespace-name", "no-cert-manager",
        "ledger-no-url", "ledger-not-postgres", "no-prometheus-operator", "kube-1.28", "service-monitor-no-crds",
        "metrics-port", "pdb-budget", "pdb-both", "gateway-no-database", "gateway-no-policies", "gateway-no-tls",
        "gateway-auth-mode", "gateway-oidc-no-issuer", "gateway-tokens-no-secret", "gateway-sslmode",
        "gateway-policy-name", "gateway-ungoverned-namespace", "gateway-signing-key-without-ledger"])
def test_bad_values_are_refused_with_a_reason(helm: Helm, args: list[str], message: str) -> None:
    r = helm.template(*args, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_chart_crds_are_the_repository_crds(helm: Helm) -> None:
    src = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    dst = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert src == dst and len(src) == 3
    _, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", src, shallow=False)
    assert not mismatch and not errors, f"run scripts/sync-chart-crds.sh: {mismatch or errors} differ"
    assert subprocess.run(["bash", str(ROOT / "scripts" / "sync-chart-crds.sh"), "--check"]).returncode == 0
    # helm installs them from crds/ (never templated, never upgraded).
    rendered = [d for d in yaml.safe_load_all(helm.template("--include-crds").stdout) if d]
    assert {d["metadata"]["name"] for d in rendered if d["kind"] == "CustomResourceDefinition"} == {
        "guardrailpolicies.dbguard.io", "databaseaccesses.dbguard.io", "approvalrequests.dbguard.io"}


def test_chart_requires_kubernetes_with_native_sidecars() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"] == ">=1.29.0-0"
    assert chart["appVersion"] == _project_version()


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- the operator's pod -------------------------------------------------------------------------------


def test_operator_runs_with_the_flags_the_chart_promises(default: Manifests) -> None:
    container = operator_container(default)
    assert container["image"] == f"ghcr.io/dbguard/dbguard:{_project_version()}"
    args = parse_operator_args(container["args"])
    assert args.operator_namespace == NAMESPACE
    assert args.webhook_service == f"{NAMESPACE}/dbguard-webhook:443"
    assert args.webhook_listen == ("0.0.0.0", 9443) and args.health_listen == ("0.0.0.0", 8080)
    assert args.metrics_listen == ("0.0.0.0", 8081)
    assert args.webhook_config_name == "dbguard"
    assert args.proxy_image == container["image"]
    assert args.namespace == [] and args.cert_dir == "" and args.log_level == "INFO"


def test_operator_pod_is_restricted_and_probed(default: Manifests) -> None:
    deploy = default.one("Deployment", "dbguard-operator")
    spec = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert spec["serviceAccountName"] == "dbguard"
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                       "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    c = operator_container(default)
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"webhook": 9443, "health": 8080, "metrics": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # The read-only root file system leaves /tmp (the webhook certificate files) writable.
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {v["name"]: v for v in spec["volumes"]}["tmp"]["emptyDir"]["medium"] == "Memory"


def test_webhook_service_reaches_the_operator_pod(default: Manifests) -> None:
    svc = default.one("Service", "dbguard-webhook")
    assert svc["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    pod_labels = default.one("Deployment", "dbguard-operator")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert default.one("ServiceAccount", "dbguard")["metadata"]["namespace"] == NAMESPACE


def test_scheduling_values_reach_the_pod(helm: Helm) -> None:
    m = helm.render("--set", "operator.nodeSelector.pool=system",
                    "--set", "operator.tolerations[0].key=dedicated",
                    "--set", "operator.tolerations[0].operator=Exists",
                    "--set", "operator.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
                             "[0].weight=1",
                    "--set", "imagePullSecrets[0].name=regcred",
                    "--set", "image.digest=sha256:" + "a" * 64,
                    "--set", "proxy.image=registry.example/dbguard-proxy:1.2.3")
    spec = m.one("Deployment", "dbguard-operator")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "system"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert spec["affinity"]["nodeAffinity"] and spec["imagePullSecrets"] == [{"name": "regcred"}]
    c = spec["containers"][0]
    assert c["image"] == "ghcr.io/dbguard/dbguard@sha256:" + "a" * 64
    assert parse_operator_args(c["args"]).proxy_image == "registry.example/dbguard-proxy:1.2.3"


def test_no_image_is_floating(helm: Helm) -> None:
    m = helm.render(*sets(opa__enabled="true"), *GATEWAY)
    images = [c["image"] for d in m.docs if d["kind"] in ("Deployment", "Job")
              for c in d["spec"]["template"]["spec"]["containers"]]
    assert len(images) == 4
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


# -- RBAC: least privilege ----------------------------------------------------------------------------


def test_operator_cluster_role_is_exactly_what_the_operator_calls(default: Manifests) -> None:
    role = default.one("ClusterRole", "dbguard-operator")
    assert rule_set(role["rules"]) == NAMESPACED | CLUSTER
    binding = default.one("ClusterRoleBinding", "dbguard-operator")
    assert binding["roleRef"]["name"] == "dbguard-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dbguard", "namespace": NAMESPACE}]
    # Its own webhook certificate: a Role in the release namespace, narrowed to the Secret's name.
    tls = default.one("Role", "dbguard-webhook-tls", NAMESPACE)
    assert rule_set(tls["rules"]) == WEBHOOK_TLS
    assert default.one("RoleBinding", "dbguard-webhook-tls", NAMESPACE)["roleRef"]["name"] == "dbguard-webhook-tls"


def test_tokenreview_role_is_what_the_operator_binds_for_sidecars(default: Manifests) -> None:
    from dbguard.controller import access

    role = default.one("ClusterRole", access.TOKENREVIEW_ROLE)
    assert rule_set(role["rules"]) == {("authentication.k8s.io", "tokenreviews", "create", "*")}


def test_governed_namespaces_get_roles_and_the_cluster_role_shrinks(helm: Helm) -> None:
    m = helm.render("--set", "namespaces={shop,billing}")
    assert rule_set(m.one("ClusterRole", "dbguard-operator")["rules"]) == CLUSTER | {
        ("", "namespaces", "list", "*"), ("", "namespaces", "watch", "*")}
    for ns in ("shop", "billing"):
        assert rule_set(m.one("Role", "dbguard-operator", ns)["rules"]) == NAMESPACED
        binding = m.one("RoleBinding", "dbguard-operator", ns)
        assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": "dbguard", "namespace": NAMESPACE}
    assert parse_operator_args(operator_container(m)["args"]).namespace == ["shop", "billing"]


def test_webhook_config_name_narrows_the_rbac(helm: Helm) -> None:
    m = helm.render(*sets(operator__webhookConfigName="dbguard-prod"))
    names = {r[3] for r in rule_set(m.one("ClusterRole", "dbguard-operator")["rules"])
             if r[0] == "admissionregistration.k8s.io"}
    assert names == {"*", "dbguard-prod"}
    assert rule_set(m.one("Role", "dbguard-webhook-tls")["rules"]) >= {("", "secrets", "get", "dbguard-prod-webhook-tls")}
    assert parse_operator_args(operator_container(m)["args"]).webhook_config_name == "dbguard-prod"


def test_rbac_can_be_left_to_the_platform(helm: Helm) -> None:
    m = helm.render(*sets(rbac__create="false", serviceAccount__create="false", serviceAccount__name="ops"))
    assert not m.all("ClusterRole") and not m.all("Role") and not m.all("ServiceAccount")
    assert m.one("Deployment", "dbguard-operator")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# -- certificates -------------------------------------------------------------------------------------


def test_cert_manager_mode_mounts_its_certificate(helm: Helm) -> None:
    m = helm.render(*CERT_MANAGER)
    c = operator_container(m)
    assert parse_operator_args(c["args"]).cert_dir == "/etc/dbguard/webhook-tls"
    assert {"name": "webhook-tls", "mountPath": "/etc/dbguard/webhook-tls", "readOnly": True} in c["volumeMounts"]
    volumes = {v["name"]: v for v in m.one("Deployment", "dbguard-operator")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhook-tls"]["secret"]["secretName"] == "dbguard-webhook-cert"
    cert = m.one("Certificate", "dbguard-webhook")
    assert cert["spec"]["secretName"] == "dbguard-webhook-cert"
    assert cert["spec"]["dnsNames"] == [f"dbguard-webhook.{NAMESPACE}.svc", f"dbguard-webhook.{NAMESPACE}.svc.cluster.local"]
    # A CA issuer, so that the Secret carries ca.crt for the webhooks' caBundle.
    assert cert["spec"]["issuerRef"]["name"] == "dbguard-webhook-ca"
    assert m.one("Certificate", "dbguard-webhook-ca")["spec"]["isCA"] is True
    assert m.one("Issuer", "dbguard-webhook-ca")["spec"]["ca"]["secretName"] == "dbguard-webhook-ca"
    # The operator does not write Secrets in this mode.
    assert not m.all("Role")


def test_cert_manager_mode_can_use_an_existing_issuer(helm: Helm) -> None:
    m = helm.render(*CERT_MANAGER, *sets(webhook__certs__certManager__issuerRef__name="corp-ca",
                                         webhook__certs__certManager__issuerRef__kind="ClusterIssuer"))
    assert m.names("Issuer") == set() and m.names("Certificate") == {"dbguard-webhook"}
    assert m.one("Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                        "group": "cert-manager.io"}


# -- OPA, ledger, metrics, uninstall ------------------------------------------------------------------


def test_opa_server_is_optional_restricted_and_fenced(helm: Helm, default: Manifests) -> None:
    assert "dbguard-opa" not in default.names("Deployment")
    m = helm.render(*sets(opa__enabled="true"))
    deploy = m.one("Deployment", "dbguard-opa")
    [c] = deploy["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "openpolicyagent/opa:1.22.2-static"
    assert c["args"][:2] == ["run", "--server"] and "--addr=0.0.0.0:8181" in c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deploy["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert m.one("Service", "dbguard-opa")["spec"]["ports"][0]["port"] == 8181
    netpol = m.one("NetworkPolicy", "dbguard-opa")
    api = netpol["spec"]["ingress"][0]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
        {"key": "dbguard.io/access", "operator": "Exists"}]}} in api["from"]


def test_opa_server_args_are_ones_the_real_opa_takes(helm: Helm, tmp_path: pathlib.Path) -> None:
    """The rendered command line, on the real OPA binary, serves /health on the diagnostic address."""
    opa = tools_bin() / "opa"
    if not opa.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-tools.sh"), "opa"], check=True)
    m = helm.render(*sets(opa__enabled="true"))
    args = m.one("Deployment", "dbguard-opa")["spec"]["template"]["spec"]["containers"][0]["args"]
    api, diag = free_port(), free_port()
    local = [a.replace("0.0.0.0:8181", f"127.0.0.1:{api}").replace("0.0.0.0:8282", f"127.0.0.1:{diag}")
             for a in args]
    assert local != args
    proc = subprocess.Popen([str(opa), *local], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"opa {shlex.join(local)} exited: {proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{diag}/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=20, interval=0.1, what="opa /health on the diagnostic address")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ledger_secret_is_what_a_database_access_refers_to(helm: Helm, default: Manifests) -> None:
    assert not default.all("Secret")
    url = "postgresql://ledger:pw@ledger-db.dbguard.svc:5432/ledger?sslmode=verify-full"
    m = helm.render("--set", "ledger.secret.create=true", "--set", f"ledger.url={url}",
                    "--set", "ledger.namespaces={shop,billing}")
    for ns in ("shop", "billing"):
        secret = m.one("Secret", "dbguard-ledger", ns)
        assert secret["stringData"] == {"url": url}
    # The same names as the CRD's defaults for spec.proxy.ledger.secret (key "url").
    crd = yaml.safe_load((ROOT / "crds" / "databaseaccesses.yaml").read_text())
    ledger = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["proxy"][
        "properties"]["ledger"]["properties"]["secret"]["properties"]
    assert ledger["key"]["default"] == "url"


def test_pod_monitor_scrapes_every_injected_proxy(helm: Helm) -> None:
    from dbguard.controller import inject

    m = helm.render(*sets(metrics__podMonitor__enabled="true"), "--api-versions", "monitoring.coreos.com/v1")
    pm = m.one("PodMonitor", "dbguard-proxies")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["selector"]["matchExpressions"] == [{"key": "dbguard.io/access", "operator": "Exists"}]
    sidecar = inject.sidecar_container({"metadata": {"name": "a"}, "spec": {
        "database": {"host": "h", "name": "d", "credentialsSecret": {"name": "s"}}, "policies": ["p"]}}, "img", "r")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == sidecar["ports"][0]["name"]


def test_uninstall_hook_removes_the_operators_webhook_configurations(default: Manifests) -> None:
    job = default.one("Job", "dbguard-cleanup")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "dbguard" and spec["securityContext"]["runAsNonRoot"] is True
    [c] = spec["containers"]
    assert c["command"][:2] == ["python", "-c"] and c["securityContext"]["readOnlyRootFilesystem"] is True
    compile(c["command"][2], "cleanup-hook", "exec")
    assert 'webhook_config.remove(client.ApiClient(), "dbguard")' in c["command"][2]
    # (tests/chart/test_install.py runs this very script as the operator's ServiceAccount.)


def test_notes_tell_the_next_steps(helm: Helm) -> None:
    r = helm.run("install", "dbguard", str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = r.stdout.split("NOTES:", 1)[1]
    for step in ("examples/policy.yaml", "examples/k8s/databaseaccess.yaml", "dbguard.io/access",
                 "kubectl -n NS patch approvalrequest", "kubectl apply --server-side -f"):
        assert step in notes, step
    assert "gateway" not in notes
    r = helm.run("install", "dbguard", str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *GATEWAY)
    notes = r.stdout.split("NOTES:", 1)[1]
    assert "PGPASSWORD=$(kubectl -n NS create token SA --audience dbguard) \\\n" in notes
    assert 'host=dbguard-gateway.dbguard-system.svc port=5432 dbname=shop user=NS:SA sslmode=verify-full' in notes


def test_values_schema_covers_every_default() -> None:
    """values.yaml and values.schema.json agree (a key added to one only is caught here, not by users)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v: object, s: dict, path: str) -> None:
        if isinstance(v, dict) and s.get("type") == "object" and "properties" in s:
            for key, sub in v.items():
                assert key in s["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, s["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


def test_every_value_is_documented_in_values_yaml() -> None:
    """Line by line: each key the schema knows has a comment above it (or on its line) in values.yaml.
    The children of Kubernetes objects passed through as they are (resources) are documented by their parent."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not key or line.lstrip().startswith("#"):
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key.group(2)]
        stack.append((indent, key.group(2)))
        node: dict | None = schema
        for part in path:
            node = (node or {}).get("properties", {}).get(part) if node is not None else None
        if node is None or "resources" in path[:-1]:
            continue  # not a chart key (a default inside a free-form object)
        commented = "#" in line.split(":", 1)[1] or (i > 0 and lines[i - 1].lstrip().startswith("#"))
        if not commented:
            undocumented.append(".".join(path))
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


# -- disruption budgets, operator metrics -------------------------------------------------------------


def test_operator_has_a_disruption_budget_that_never_blocks_a_drain(default: Manifests, helm: Helm) -> None:
    pdb = default.one("PodDisruptionBudget", "dbguard-operator")
    pod_labels = default.one("Deployment", "dbguard-operator")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # The cleanup Job's and OPA's pods are not the operator's.
    m = helm.render(*sets(opa__enabled="true"))
    for kind, name in (("Job", "dbguard-cleanup"), ("Deployment", "dbguard-opa")):
        labels = m.one(kind, name)["spec"]["template"]["metadata"]["labels"]
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    strict = helm.render("--set", "operator.podDisruptionBudget.maxUnavailable=null",
                         "--set", "operator.podDisruptionBudget.minAvailable=1")
    assert strict.one("PodDisruptionBudget", "dbguard-operator")["spec"]["minAvailable"] == 1
    assert not helm.render(*sets(operator__podDisruptionBudget__enabled="false")).all("PodDisruptionBudget")


def test_operator_metrics_service_reaches_the_metrics_port(default: Manifests, helm: Helm) -> None:
    svc = default.one("Service", "dbguard-operator-metrics")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = default.one("Deployment", "dbguard-operator")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    # The webhook Service is not a metrics target (the ServiceMonitor selects by the component label).
    assert "app.kubernetes.io/component" not in default.one("Service", "dbguard-webhook")["metadata"]["labels"]
    off = helm.render(*sets(metrics__operator__enabled="false"))
    assert "dbguard-operator-metrics" not in off.names("Service")
    container = operator_container(off)
    assert parse_operator_args(container["args"]).metrics_listen is None
    assert "metrics" not in {p["name"] for p in container["ports"]}


def test_service_monitors_scrape_the_operator_and_the_gateway(helm: Helm, default: Manifests) -> None:
    assert not default.all("ServiceMonitor")
    m = helm.render(*sets(metrics__serviceMonitor__enabled="true", metrics__serviceMonitor__interval="15s",
                          metrics__serviceMonitor__labels__release="prom"), *PROMETHEUS_OPERATOR,
                    *GATEWAY, *sets(gateway__namespace="gateways"))
    for name, svc_name, ns in (("dbguard-operator", "dbguard-operator-metrics", NAMESPACE),
                               ("dbguard-gateway", "dbguard-gateway", "gateways")):
        sm = m.one("ServiceMonitor", name, ns)
        assert sm["metadata"]["labels"]["release"] == "prom"
        svc = m.one("Service", svc_name, ns)
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        [endpoint] = sm["spec"]["endpoints"]
        assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    # Each selects its own Service only.
    webhook = m.one("Service", "dbguard-webhook")
    for sm in m.all("ServiceMonitor"):
        assert not sm["spec"]["selector"]["matchLabels"].items() <= webhook["metadata"]["labels"].items()
    # The PodMonitor (sidecars) stays separate and optional.
    assert not m.all("PodMonitor")


def test_grafana_dashboard_configmap_carries_the_dashboard_json(helm: Helm, default: Manifests) -> None:
    assert "dbguard-dashboard" not in default.names("ConfigMap")
    m = helm.render(*sets(metrics__grafanaDashboard__enabled="true"))
    cm = m.one("ConfigMap", "dbguard-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["dbguard.json"]) == json.loads((CHART / "dashboards" / "dbguard.json").read_text())


# -- the gateway --------------------------------------------------------------------------------------


def parse_proxy_args(args: list[str]) -> argparse.Namespace:
    """The rendered args, parsed by the proxy's own command line (a renamed flag fails here)."""
    from dbguard.session import cli

    assert args[0] == "proxy"
    parser = argparse.ArgumentParser(prog="dbguard proxy", exit_on_error=False)
    cli.add_arguments(parser)
    parsed = parser.parse_args(args[1:])
    cli.identity_settings(parsed)  # the identity flags fit together (raises ConfigError otherwise)
    return parsed


def gateway_container(m: Manifests, ns: str = NAMESPACE) -> dict:
    [container] = m.one("Deployment", "dbguard-gateway", ns)["spec"]["template"]["spec"]["containers"]
    return container


def test_gateway_is_off_by_default(default: Manifests) -> None:
    for kind in ("Deployment", "Service", "ServiceAccount", "Role", "PodDisruptionBudget", "ClusterRoleBinding"):
        assert not {n for n in default.names(kind) if "gateway" in n}, kind


def test_gateway_runs_the_proxy_with_tokenreview_tls_policies_approvals_and_ledger(helm: Helm) -> None:
    m = helm.render(*GATEWAY, *sets(gateway__ledger__secret__name="dbguard-ledger",
                                    gateway__maskingKeySecret__name="masking", gateway__database__sslMode="verify-full",
                                    gateway__database__caSecret__name="db-ca"))
    c = gateway_container(m)
    args = parse_proxy_args(c["args"])
    assert args.listen == ("0.0.0.0", 6432) and args.metrics_listen == ("0.0.0.0", 9187)
    assert args.upstream == ("postgresql://$(DBGUARD_DATABASE_USER)@db.shop.svc:5432/shop?sslmode=verify-full"
                             "&sslrootcert=/var/run/dbguard/database-ca/ca.crt")
    assert args.auth == "tokenreview" and args.token_audience == "dbguard"
    assert (args.tls_cert, args.tls_key, args.require_tls) == (
        "/var/run/dbguard/tls/tls.crt", "/var/run/dbguard/tls/tls.key", True)
    assert args.policy == ["/etc/dbguard/policies/shop-guardrails/policy.yaml",
                           "/etc/dbguard/policies/pii-masking/policy.yaml"]
    assert args.approvals == f"kubernetes:{NAMESPACE}"
    assert args.ledger == "env:DBGUARD_LEDGER_URL" and args.masking_key == "/var/run/dbguard/masking/key"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {"DBGUARD_DATABASE_USER": {"name": "shop-db", "key": "username"},
                   "DBGUARD_LEDGER_URL": {"name": "dbguard-ledger", "key": "url"}}
    # Every file the args name is on a mounted volume, and the policies are directories (never subPath:
    # a subPath mount would never see a new revision).
    mounts = {v["mountPath"]: v for v in c["volumeMounts"]}
    for path in (args.upstream_password_file, args.tls_cert, args.tls_key, args.masking_key, *args.policy,
                 "/var/run/dbguard/database-ca/ca.crt"):
        assert pathlib.PurePosixPath(path).parent.as_posix() in mounts, path
    assert not any("subPath" in v for v in c["volumeMounts"])
    spec = m.one("Deployment", "dbguard-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["policy-shop-guardrails"]["configMap"]["name"] == "dbguard-policy-shop-guardrails"
    assert volumes["database"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert volumes["tls"]["secret"]["secretName"] == "gateway-tls"
    # Restricted like the operator, with its own ServiceAccount.
    assert spec["serviceAccountName"] == "dbguard-gateway" and spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The Service: PostgreSQL and metrics, to the gateway's pods only.
    svc = m.one("Service", "dbguard-gateway")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("postgres", 5432, "postgres"), ("metrics", 9187, "metrics")]
    pod_labels = m.one("Deployment", "dbguard-gateway")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    operator_labels = m.one("Deployment", "dbguard-operator")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= operator_labels.items()
    pdb = m.one("PodDisruptionBudget", "dbguard-gateway")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert m.one("Deployment", "dbguard-gateway")["spec"]["replicas"] == 2


def test_gateway_rbac_is_tokenreview_and_approval_requests_in_its_namespace(helm: Helm) -> None:
    m = helm.render(*GATEWAY, *sets(gateway__namespace="gateways"))
    role = m.one("Role", "dbguard-gateway", "gateways")
    assert rule_set(role["rules"]) == {
        *{("dbguard.io", "approvalrequests", v, "*") for v in ("create", "get", "list", "watch")},
        *{("dbguard.io", "approvalrequests/status", v, "*") for v in ("get", "update", "patch")}}
    subject = {"kind": "ServiceAccount", "name": "dbguard-gateway", "namespace": "gateways"}
    assert m.one("RoleBinding", "dbguard-gateway", "gateways")["subjects"] == [subject]
    crb = m.one("ClusterRoleBinding", "dbguard-gateway-tokenreview")
    assert crb["roleRef"]["name"] == "dbguard-tokenreview" and crb["subjects"] == [subject]
    assert m.one("ServiceAccount", "dbguard-gateway", "gateways")
    assert parse_proxy_args(gateway_container(m, "gateways")["args"]).approvals == "kubernetes:gateways"
    # No approvals, no Role; no TokenReview, no binding.
    m = helm.render(*GATEWAY, *sets(gateway__approvals="false", gateway__auth__mode="oidc",
                                    gateway__auth__oidc__issuer="https://idp.example.com",
                                    gateway__auth__oidc__audience="dbguard"))
    assert "dbguard-gateway" not in m.names("Role")
    assert "dbguard-gateway-tokenreview" not in m.names("ClusterRoleBinding")
    assert not parse_proxy_args(gateway_container(m)["args"]).approvals


@pytest.mark.parametrize(("values", "expected"), [
    (sets(gateway__auth__mode="oidc", gateway__auth__oidc__issuer="https://idp.example.com",
          gateway__auth__oidc__audience="dbguard", gateway__auth__oidc__usernameClaim="email",
          gateway__auth__oidc__usernamePrefix="oidc:"),
     {"auth": "oidc", "oidc_issuer": "https://idp.example.com", "oidc_audience": "dbguard",
      "oidc_username_claim": "email", "oidc_groups_claim": "groups", "oidc_username_prefix": "oidc:"}),
    (sets(gateway__auth__mode="tokens", gateway__auth__tokens__secretName="gateway-tokens"),
     {"tokens": "/etc/dbguard/tokens/tokens.yaml", "auth": None}),
    (sets(gateway__tls__secretName="", gateway__tls__insecurePlaintext="true"),
     {"tls_cert": None, "require_tls": False}),
    (["--set", "gateway.extraArgs={--policy-timeout,0.5}"], {"policy_timeout": 0.5}),
], ids=["oidc", "tokens", "plaintext", "extra-args"])
def test_gateway_identity_and_tls_variants(helm: Helm, values: list[str], expected: dict) -> None:
    args = parse_proxy_args(gateway_container(helm.render(*GATEWAY, *values))["args"])
    for key, value in expected.items():
        assert getattr(args, key) == value, key
