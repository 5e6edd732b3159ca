"""Every rendering of the chart that the values allow, checked by the real API server: each value set
is rendered by the real helm and sent with ``kubectl apply --dry-run=server --validate=strict``, so
the Kubernetes schemas (unknown or misplaced fields, types), defaulting and object validation (a
PodDisruptionBudget with both budgets, a bad probe, a port name) judge every object, not a linter.
Then the gateway is installed for real and its ServiceAccount's RBAC is asked of the authorizer.

prometheus-operator's and cert-manager's kinds are left out of the dry run: their CRDs are not on
this API server (tests/chart/test_chart.py checks those objects' fields).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest
import yaml

from tests.chart.conftest import CHART, NAMESPACE, RELEASE, Helm, sets
from tests.chart.test_chart import GATEWAY
from tests.fix_kube import KubePlane, start_plane
from tests.fix_operator import install_crds

FOREIGN_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
NAMESPACES = (NAMESPACE, "shop", "billing", "gateways")

VARIANTS = {
    "default": [],
    "opa": sets(opa__enabled="true", opa__replicas="2"),
    "namespaces+ledger": ["--set", "namespaces={shop,billing}", *sets(ledger__secret__create="true",
                                                                      ledger__url="postgresql://l:p@ledger/l"),
                          "--set", "ledger.namespaces={shop,billing}"],
    "gateway-tokenreview": [*GATEWAY, *sets(gateway__namespace="gateways", gateway__ledger__secret__name="dbguard-ledger",
                                            gateway__maskingKeySecret__name="masking",
                                            gateway__rowEvidence__enabled="true",
                                            gateway__database__sslMode="verify-full",
                                            gateway__database__caSecret__name="db-ca", gateway__replicas="3",
                                            gateway__service__type="LoadBalancer",
                                            gateway__podDisruptionBudget__maxUnavailable="34%")],
    "gateway-oidc": [*GATEWAY, *sets(gateway__auth__mode="oidc", gateway__auth__oidc__issuer="https://idp.example.com",
                                     gateway__auth__oidc__audience="dbguard",
                                     gateway__auth__oidc__usernamePrefix="oidc:", gateway__approvals="false")],
    "gateway-tokens-plaintext": [*GATEWAY, *sets(gateway__auth__mode="tokens",
                                                 gateway__auth__tokens__secretName="gateway-tokens",
                                                 gateway__tls__secretName="", gateway__tls__insecurePlaintext="true",
                                                 gateway__replicas="1")],
    "gateway-governed-namespaces": [*GATEWAY, "--set", "namespaces={shop,gateways}", *sets(gateway__namespace="gateways")],
    "monitoring+dashboard": [*GATEWAY, "--api-versions", "monitoring.coreos.com/v1",
                             *sets(metrics__serviceMonitor__enabled="true", metrics__podMonitor__enabled="true",
                                   metrics__grafanaDashboard__enabled="true")],
    "cert-manager": ["--api-versions", "cert-manager.io/v1", *sets(webhook__certs__mode="certManager")],
    "no-rbac-no-metrics": sets(rbac__create="false", serviceAccount__create="false", serviceAccount__name="ops",
                               metrics__operator__enabled="false", cleanupOnUninstall="false"),
    "strict-disruption-budgets": [*GATEWAY, "--set", "operator.podDisruptionBudget.maxUnavailable=null",
                                  "--set", "operator.podDisruptionBudget.minAvailable=1",
                                  "--set", "gateway.podDisruptionBudget.maxUnavailable=null",
                                  "--set", "gateway.podDisruptionBudget.minAvailable=50%"],
}


@pytest.fixture(scope="module")
def plane() -> KubePlane:
    p = start_plane(pathlib.Path(tempfile.mkdtemp(prefix="dbguard-chart-validate-")))
    try:
        for ns in NAMESPACES:
            p.kubectl("create", "namespace", ns)
        install_crds(p)
        yield p
    finally:
        p.stop()
        shutil.rmtree(p.dir, ignore_errors=True)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_every_rendered_object_is_accepted_by_the_api_server(plane: KubePlane, helm: Helm, variant: str) -> None:
    rendered = [d for d in yaml.safe_load_all(helm.template(*VARIANTS[variant]).stdout) if d]
    ours = [d for d in rendered if not d["apiVersion"].startswith(FOREIGN_GROUPS)]
    assert ours and len(ours) >= len(rendered) - 4
    r = plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump_all(ours),
                      check=False)
    assert r.returncode == 0, f"the API server refused the {variant} rendering:\n{r.stderr}"
    # One answer per object, each a server-side dry run (nothing was created).
    assert r.stdout.count("(server dry run)") == len(ours), r.stdout
    assert "warning" not in r.stderr.lower(), r.stderr


def test_an_object_the_schemas_refuse_is_caught(plane: KubePlane, helm: Helm) -> None:
    """The check above has teeth: a misspelt field in a rendered Deployment is refused, naming it."""
    rendered = [d for d in yaml.safe_load_all(helm.template(*GATEWAY).stdout) if d]
    gateway = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "dbguard-gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"tcpSocket": {"port": 6432}}
    r = plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump(gateway),
                      check=False)
    assert r.returncode != 0 and "readinessprobe" in r.stderr, r.stderr


# -- the gateway's RBAC, asked of the authorizer ----------------------------------------------------------

GATEWAY_SA = "system:serviceaccount:gateways:dbguard-gateway"
# (verb, resource, namespace or None for cluster-wide)
GATEWAY_MUST = [
    ("create", "tokenreviews.authentication.k8s.io", None),
    *[(verb, "approvalrequests.dbguard.io", "gateways") for verb in ("create", "get", "list", "watch")],
    *[(verb, "approvalrequests.dbguard.io/status", "gateways") for verb in ("get", "update", "patch")],
]
GATEWAY_MUST_NOT = [
    # Deciding its own requests: the spec is the approvers' (patch/update of the main resource).
    ("patch", "approvalrequests.dbguard.io", "gateways"), ("update", "approvalrequests.dbguard.io", "gateways"),
    ("delete", "approvalrequests.dbguard.io", "gateways"),
    ("create", "approvalrequests.dbguard.io", "shop"), ("list", "approvalrequests.dbguard.io", None),
    ("get", "secrets", "gateways"), ("list", "configmaps", "gateways"), ("update", "configmaps", "gateways"),
    ("patch", "guardrailpolicies.dbguard.io", "gateways"), ("create", "pods", "gateways"),
    ("create", "serviceaccounts/token", "gateways"), ("impersonate", "users", None),
    ("create", "subjectaccessreviews.authorization.k8s.io", None),
]


def test_gateway_service_account_may_file_approvals_and_review_tokens_and_nothing_more(
        plane: KubePlane, helm: Helm) -> None:
    values = [*GATEWAY, *sets(gateway__namespace="gateways")]
    helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, *values, env=plane.env())
    assert plane.kubectl("-n", "gateways", "get", "deployment,service,serviceaccount,role,rolebinding,pdb",
                         "dbguard-gateway").returncode == 0

    def can(verb: str, resource: str, ns: str | None) -> bool:
        sub = None
        if resource.endswith("/status") or resource.endswith("/token"):
            resource, sub = resource.rsplit("/", 1)
        args = ["auth", "can-i", verb, resource, f"--as={GATEWAY_SA}"]
        args += ["-n", ns] if ns else ["--all-namespaces"]
        args += [f"--subresource={sub}"] if sub else []
        r = plane.kubectl(*args, check=False)
        assert r.stdout.strip() in ("yes", "no"), r.stderr
        return r.stdout.strip() == "yes"

    denied = [m for m in GATEWAY_MUST if not can(*m)]
    assert not denied, f"the gateway needs these and is refused: {denied}"
    allowed = [m for m in GATEWAY_MUST_NOT if can(*m)]
    assert not allowed, f"least privilege: the gateway should not be able to {allowed}"
