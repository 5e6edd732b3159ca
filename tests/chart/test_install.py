"""The chart installed by the real helm into a real API server, and its RBAC proven both ways:
``kubectl auth can-i`` as the chart's ServiceAccount for every call the operator makes (and for
calls it must not be able to make), then the real ``dbguard operator`` process authenticated *as
that ServiceAccount* (a TokenRequest token) reconciling policies and accesses, injecting a sidecar
and stamping an approval, and the uninstall hook's script removing the webhooks, with no 403.

Each test module gets its own control plane (3 s): the release owns cluster-scoped objects (the
dbguard-tokenreview ClusterRole, webhook configurations with failurePolicy Fail) that must not
meet the session plane's operator tests.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import yaml

from tests.chart.conftest import CHART, NAMESPACE, RELEASE, ROOT, Helm
from tests.fix_kube import KubePlane, start_plane
from tests.fix_postgres import free_port, stop_process, wait_until

SA = f"system:serviceaccount:{NAMESPACE}:dbguard"
POLICY = (ROOT / "examples" / "policy.yaml").read_text()
APPROVER_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: approver}
rules:
- {apiGroups: [dbguard.io], resources: [approvalrequests], verbs: [get, list, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: approver}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: approver}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}]
"""


@dataclasses.dataclass
class Release:
    plane: KubePlane
    helm: Helm
    governed: str  # a namespace the operator governs

    def helm_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.helm.run(*args, "--namespace", NAMESPACE, env=self.plane.env(), check=check)

    def can(self, verb: str, resource: str, namespace: str | None = None, subresource: str | None = None) -> bool:
        """``kubectl auth can-i`` as the operator's ServiceAccount (namespace None: cluster-wide / all)."""
        args = ["auth", "can-i", verb, resource, f"--as={SA}"]
        args += ["-n", namespace] if namespace else ["--all-namespaces"]
        if subresource:
            args += [f"--subresource={subresource}"]
        r = self.plane.kubectl(*args, check=False)
        assert r.stdout.strip() in ("yes", "no"), r.stderr
        return r.stdout.strip() == "yes"


def install(plane: KubePlane, helm: Helm, *values: str) -> Release:
    plane.kubectl("create", "namespace", NAMESPACE)
    governed = plane.namespace("shop")
    release = Release(plane, helm, governed)
    expanded = [v.replace("GOVERNED", governed) for v in values]
    # Validated by the API server first (admission, schemas), then for real. No --wait: no kubelet here.
    dry = release.helm_run("install", RELEASE, str(CHART), "--dry-run=server", *expanded)
    assert "STATUS: pending-install" in dry.stdout, dry.stdout
    assert plane.kubectl("get", "clusterrole", "dbguard-tokenreview", check=False).returncode != 0
    release.helm_run("install", RELEASE, str(CHART), *expanded)
    for plural in ("guardrailpolicies", "databaseaccesses", "approvalrequests"):
        plane.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{plural}.dbguard.io")
    return release


@pytest.fixture(scope="module")
def plane() -> KubePlane:
    p = start_plane(pathlib.Path(tempfile.mkdtemp(prefix="dbguard-chart-")))
    try:
        yield p
    finally:
        p.stop()
        shutil.rmtree(p.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def release(plane: KubePlane, helm: Helm) -> Release:
    return install(plane, helm)


def test_helm_installs_crds_and_the_operator(release: Release) -> None:
    status = json.loads(release.helm_run("status", RELEASE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    plane = release.plane
    deploy = json.loads(plane.kubectl("-n", NAMESPACE, "get", "deployment", "dbguard-operator", "-o", "json").stdout)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "dbguard"
    assert plane.kubectl("-n", NAMESPACE, "get", "service", "dbguard-webhook").returncode == 0
    # The CRDs came from the chart's crds/ (this plane had none).
    crd = json.loads(plane.kubectl("get", "crd", "databaseaccesses.dbguard.io", "-o", "json").stdout)
    assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dbguard"


# -- RBAC, asked of the API server's authorizer ----------------------------------------------------------

# (verb, resource, subresource, where): where is "governed", "release", or None (cluster-wide / all).
MUST = [
    *[(verb, kind, None, None) for kind in ("guardrailpolicies.dbguard.io", "databaseaccesses.dbguard.io",
                                            "approvalrequests.dbguard.io") for verb in ("get", "list", "watch", "patch")],
    *[("patch", kind, "status", None) for kind in ("guardrailpolicies.dbguard.io", "databaseaccesses.dbguard.io",
                                                   "approvalrequests.dbguard.io")],
    ("get", "configmaps", None, "governed"), ("create", "configmaps", None, "governed"),
    ("update", "configmaps", None, "governed"),
    ("get", "secrets", None, "governed"),
    ("list", "pods", None, "governed"),
    ("create", "events", None, "governed"),
    ("create", "roles.rbac.authorization.k8s.io", None, "governed"),
    ("update", "roles.rbac.authorization.k8s.io/dbguard-approval-requester", None, "governed"),
    ("bind", "roles.rbac.authorization.k8s.io/dbguard-approval-requester", None, "governed"),
    ("create", "rolebindings.rbac.authorization.k8s.io", None, "governed"),
    ("update", "rolebindings.rbac.authorization.k8s.io", None, "governed"),
    ("create", "approvalrequests.dbguard.io", None, "governed"),
    ("get", "approvalrequests.dbguard.io", "status", "governed"),
    ("update", "approvalrequests.dbguard.io", "status", "governed"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    *[(verb, f"{kind}.admissionregistration.k8s.io{name}", None, None)
      for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")
      for verb, name in (("create", ""), ("get", "/dbguard"), ("update", "/dbguard"), ("delete", "/dbguard"))],
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("update", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("delete", "clusterrolebindings.rbac.authorization.k8s.io", None, None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("bind", "clusterroles.rbac.authorization.k8s.io/dbguard-tokenreview", None, None),
    ("create", "tokenreviews.authentication.k8s.io", None, None),
    ("create", "secrets", None, "release"),
    ("get", "secrets/dbguard-webhook-tls", None, "release"),
    ("update", "secrets/dbguard-webhook-tls", None, "release"),
]
MUST_NOT = [
    ("list", "secrets", None, None), ("watch", "secrets", None, None), ("delete", "secrets", None, None),
    ("create", "secrets", None, "governed"), ("update", "secrets", None, "governed"),
    ("update", "secrets/other", None, "release"),
    ("create", "pods", None, "governed"), ("get", "pods", None, "governed"), ("patch", "pods", None, "governed"),
    ("delete", "pods", None, "governed"), ("create", "pods", "exec", "governed"),
    ("delete", "configmaps", None, "governed"), ("list", "configmaps", None, None),
    ("create", "guardrailpolicies.dbguard.io", None, None), ("update", "databaseaccesses.dbguard.io", None, None),
    ("delete", "approvalrequests.dbguard.io", None, None),
    ("update", "mutatingwebhookconfigurations.admissionregistration.k8s.io/someone-else", None, None),
    ("delete", "validatingwebhookconfigurations.admissionregistration.k8s.io/someone-else", None, None),
    ("bind", "clusterroles.rbac.authorization.k8s.io/cluster-admin", None, None),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("update", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("delete", "clusterroles.rbac.authorization.k8s.io", None, None),
    ("update", "roles.rbac.authorization.k8s.io/admin", None, "governed"),
    ("escalate", "roles.rbac.authorization.k8s.io", None, "governed"),
    ("delete", "roles.rbac.authorization.k8s.io", None, "governed"),
    ("delete", "rolebindings.rbac.authorization.k8s.io", None, "governed"),
    ("bind", "clusterroles.rbac.authorization.k8s.io/admin", None, "governed"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, None),
    ("list", "namespaces", None, None),
    ("impersonate", "users", None, None),
    ("create", "serviceaccounts", "token", "governed"),
    ("create", "deployments.apps", None, "governed"),
]


def _where(release: Release, where: str | None) -> str | None:
    return {"governed": release.governed, "release": NAMESPACE, None: None}[where]


def test_service_account_may_make_every_call_the_operator_makes(release: Release) -> None:
    denied = [m for m in MUST if not release.can(m[0], m[1], _where(release, m[3]), m[2])]
    assert not denied, f"the operator needs these and is refused: {denied}"


def test_service_account_may_not_do_more(release: Release) -> None:
    allowed = [m for m in MUST_NOT if release.can(m[0], m[1], _where(release, m[3]), m[2])]
    assert not allowed, f"least privilege: the operator should not be able to {allowed}"


# -- the real operator, as the chart's ServiceAccount ----------------------------------------------------


@dataclasses.dataclass
class ServiceAccountOperator:
    """``python -m dbguard operator`` with a kubeconfig holding only the ServiceAccount's token."""

    release: Release
    workdir: pathlib.Path
    extra: tuple[str, ...] = ()
    port: int = dataclasses.field(default_factory=free_port)
    health: int = dataclasses.field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> pathlib.Path:
        return self.workdir / "operator.log"

    def kubeconfig(self) -> pathlib.Path:
        plane = self.release.plane
        token = plane.kubectl("-n", NAMESPACE, "create", "token", "dbguard", "--duration=1h").stdout.strip()
        path = self.workdir / "sa.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "plane", "cluster": {"server": plane.server,
                                                       "certificate-authority": str(plane.ca_file)}}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "plane", "user": "sa", "namespace": NAMESPACE}}]}))
        return path

    def env(self) -> dict[str, str]:
        return {**self.release.plane.env(), "KUBECONFIG": str(self.kubeconfig()), "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        # The chart's flags, except where the API server reaches the webhooks (this machine, not a Service).
        args = [sys.executable, "-m", "dbguard", "operator", "--operator-namespace", NAMESPACE,
                "--webhook-url-host", "127.0.0.1", "--webhook-listen", f"127.0.0.1:{self.port}",
                "--webhook-config-name", "dbguard", "--proxy-image", "ghcr.io/dbguard/dbguard:0.1.0",
                "--health-listen", f"127.0.0.1:{self.health}", *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        wait_until(self._ready, timeout=60, interval=0.2, what="the operator (as its ServiceAccount) to serve")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dbguard operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=1) as r:
                healthy = r.status == 200
        except OSError:
            return False
        hooks = self.release.plane.kubectl("get", "mutatingwebhookconfiguration", "dbguard", "-o", "json", check=False)
        return healthy and hooks.returncode == 0 and f":{self.port}/" in hooks.stdout

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_never_refused(self) -> None:
        text = self.log()
        for sign in ("Forbidden", "forbidden", "Not enough permissions"):
            assert sign not in text, f"the operator was refused something ({sign}):\n{text[-4000:]}"


@pytest.fixture(scope="module")
def operator(release: Release, tmp_path_factory: pytest.TempPathFactory) -> ServiceAccountOperator:
    op = ServiceAccountOperator(release, tmp_path_factory.mktemp("sa-operator"))
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def sa_operator(operator: ServiceAccountOperator, request: pytest.FixtureRequest) -> ServiceAccountOperator:
    mark = len(operator.log())
    yield operator
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- dbguard operator log ----\n" + operator.log()[mark:][-8000:])


def get(plane: KubePlane, kind: str, ns: str, name: str) -> dict:
    return json.loads(plane.kubectl("-n", ns, "get", kind, name, "-o", "json").stdout)


def condition(obj: dict, type_: str) -> str:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), "")


def wait_condition(plane: KubePlane, kind: str, ns: str, name: str, type_: str = "Ready", value: str = "True") -> dict:
    def check() -> dict | None:
        obj = get(plane, kind, ns, name)
        return obj if condition(obj, type_) == value else None

    return wait_until(check, timeout=30, interval=0.3, what=f"{kind} {name} {type_}={value}")


def test_operator_as_its_service_account_keeps_its_certificate_and_webhooks(
        sa_operator: ServiceAccountOperator) -> None:
    plane = sa_operator.release.plane
    tls = json.loads(plane.kubectl("-n", NAMESPACE, "get", "secret", "dbguard-webhook-tls", "-o", "json").stdout)
    assert {"ca.crt", "tls.crt", "tls.key"} <= tls["data"].keys()
    validating = json.loads(plane.kubectl("get", "validatingwebhookconfiguration", "dbguard", "-o", "json").stdout)
    assert [w["name"] for w in validating["webhooks"]] == ["guard-approval.dbguard.io",
                                                            "guard-ephemeral-containers.dbguard.io"]
    # Restarting re-reads the Secret and replaces the configurations: get and update, not only create.
    sa_operator.stop()
    sa_operator.start()
    again = json.loads(plane.kubectl("-n", NAMESPACE, "get", "secret", "dbguard-webhook-tls", "-o", "json").stdout)
    assert again["data"]["ca.crt"] == tls["data"]["ca.crt"]
    sa_operator.assert_never_refused()


def test_operator_as_its_service_account_reconciles_and_injects(sa_operator: ServiceAccountOperator) -> None:
    plane, ns = sa_operator.release.plane, sa_operator.release.governed
    plane.kubectl("-n", ns, "apply", "-f", "-", input=POLICY)
    policy = wait_condition(plane, "guardrailpolicy", ns, "shop-guardrails")
    cm = get(plane, "configmap", ns, "dbguard-policy-shop-guardrails")
    assert cm["data"]["revision"] == policy["status"]["revision"]

    plane.kubectl("-n", ns, "create", "secret", "generic", "shop-db", "--from-literal=username=app",
                  "--from-literal=password=s3cret")
    access = {"apiVersion": "dbguard.io/v1alpha1", "kind": "DatabaseAccess", "metadata": {"name": "shop-api"},
              "spec": {"database": {"host": "db.example.internal", "name": "shop", "sslMode": "disable",
                                    "credentialsSecret": {"name": "shop-db"}},
                       "policies": ["shop-guardrails"], "workloads": {"serviceAccounts": ["api"]}}}
    plane.kubectl("-n", ns, "apply", "-f", "-", input=yaml.safe_dump(access))
    status = wait_condition(plane, "databaseaccess", ns, "shop-api")["status"]
    assert status["ready"] is True and status["injectedPods"] == 0
    binding = f"dbguard-tokenreview-{ns}-shop-api"
    crb = json.loads(plane.kubectl("get", "clusterrolebinding", binding, "-o", "json").stdout)
    assert crb["roleRef"]["name"] == "dbguard-tokenreview"
    # ... and its sidecars may file ApprovalRequests (a Role the operator could only create holding it).
    rb = get(plane, "rolebinding", ns, "dbguard-approval-requester-shop-api")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": "dbguard-approval-requester"}
    assert plane.kubectl("auth", "can-i", "create", "approvalrequests.dbguard.io", "-n", ns,
                         f"--as=system:serviceaccount:{ns}:api").stdout.strip() == "yes"

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api-1", "labels": {"dbguard.io/access": "shop-api"}},
           "spec": {"serviceAccountName": "api", "containers": [{"name": "app", "image": "example/app:1"}]}}
    plane.kubectl("-n", ns, "create", "-f", "-", input=yaml.safe_dump(pod))
    sidecar = get(plane, "pod", ns, "api-1")["spec"]["initContainers"][0]
    assert sidecar["name"] == "dbguard-proxy" and sidecar["image"] == "ghcr.io/dbguard/dbguard:0.1.0"

    # The finalizer removes the binding: delete on clusterrolebindings, patch on the access.
    plane.kubectl("-n", ns, "delete", "databaseaccess", "shop-api", "--timeout=30s")
    assert plane.kubectl("get", "clusterrolebinding", binding, check=False).returncode != 0
    sa_operator.assert_never_refused()


def test_operator_as_its_service_account_guards_approvals(sa_operator: ServiceAccountOperator) -> None:
    plane, ns = sa_operator.release.plane, sa_operator.release.governed
    plane.kubectl("apply", "-f", "-", input=APPROVER_RBAC)
    request = yaml.safe_load((ROOT / "examples" / "k8s" / "approvalrequest.yaml").read_text())
    request["metadata"]["name"] = "r1"
    request["spec"]["requester"] = {"user": "bob", "groups": ["developers"]}  # alice may not approve her own
    plane.kubectl("-n", ns, "create", "-f", "-", input=yaml.safe_dump(request))
    wait_until(lambda: (get(plane, "approvalrequest", ns, "r1").get("status") or {}).get("phase") == "Pending",
               timeout=30, interval=0.3, what="phase Pending")
    plane.kubectl("-n", ns, "patch", "approvalrequest", "r1", "--type", "merge",
                  "-p", '{"spec":{"decision":"Approved","reason":"CHG-42"}}', user="alice")
    wait_until(lambda: (get(plane, "approvalrequest", ns, "r1").get("status") or {}).get("phase") == "Approved",
               timeout=30, interval=0.3, what="phase Approved")
    obj = get(plane, "approvalrequest", ns, "r1")
    assert obj["status"]["decidedBy"] == "alice" and obj["spec"]["approvals"][0]["user"] == "alice"
    sa_operator.assert_never_refused()


def test_pods_that_do_not_ask_and_opted_out_namespaces_are_left_alone(sa_operator: ServiceAccountOperator) -> None:
    """The webhook's selectors as the operator registers them: an unlabelled pod, and a labelled pod in a
    namespace labelled dbguard.io/injection=disabled, are created untouched (the API server never even
    calls the webhook: there is no DatabaseAccess for them, which would otherwise refuse them)."""
    plane, ns = sa_operator.release.plane, sa_operator.release.governed

    def pod(name: str, labelled: bool) -> str:
        meta: dict = {"name": name, **({"labels": {"dbguard.io/access": "shop-api"}} if labelled else {})}
        return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                               "spec": {"containers": [{"name": "app", "image": "example/app:1"}]}})

    plane.kubectl("-n", ns, "create", "-f", "-", input=pod("plain", labelled=False))
    assert not get(plane, "pod", ns, "plain")["spec"].get("initContainers")
    opted_out = plane.namespace("optout")
    plane.kubectl("label", "namespace", opted_out, "dbguard.io/injection=disabled")
    plane.kubectl("-n", opted_out, "create", "-f", "-", input=pod("app", labelled=True))
    assert not get(plane, "pod", opted_out, "app")["spec"].get("initContainers")
    # ... while the same labelled pod in a governed namespace asks the webhook (and is refused: no access).
    refused = plane.kubectl("-n", ns, "create", "-f", "-", input=pod("app", labelled=True), check=False)
    assert refused.returncode != 0 and "shop-api" in refused.stderr, refused.stderr
    sa_operator.assert_never_refused()


def test_helm_upgrade_keeps_the_release_working(release: Release, sa_operator: ServiceAccountOperator) -> None:
    release.helm_run("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "operator.logLevel=DEBUG")
    status = json.loads(release.helm_run("status", RELEASE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed" and status["version"] == 2
    # Helm kept its hands off what the operator owns.
    assert release.plane.kubectl("get", "mutatingwebhookconfiguration", "dbguard").returncode == 0
    assert release.can("update", "secrets/dbguard-webhook-tls", NAMESPACE)


def test_uninstall_hook_script_removes_the_webhooks_as_the_service_account(
        release: Release, sa_operator: ServiceAccountOperator, helm: Helm) -> None:
    """The pre-delete Job's own script, run here with the ServiceAccount's credentials."""
    env = sa_operator.env()
    sa_operator.stop()
    rendered = [d for d in yaml.safe_load_all(helm.template().stdout) if d]
    job = next(d for d in rendered if d["kind"] == "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "python"
    r = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    plane = release.plane
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        assert plane.kubectl("get", kind, "dbguard", check=False).returncode != 0
    # helm uninstall (its hook just ran by hand; no kubelet here to run the Job) removes the release's
    # objects and leaves the CRDs and their resources.
    release.helm_run("uninstall", RELEASE, "--no-hooks")
    assert plane.kubectl("get", "clusterrole", "dbguard-operator", check=False).returncode != 0
    assert plane.kubectl("get", "crd", "guardrailpolicies.dbguard.io").returncode == 0
    assert plane.kubectl("-n", release.governed, "get", "guardrailpolicy", "shop-guardrails").returncode == 0


# -- governing a list of namespaces: Roles there, nothing namespaced cluster-wide -----------------------


@pytest.fixture(scope="module")
def namespaced(helm: Helm) -> Release:
    p = start_plane(pathlib.Path(tempfile.mkdtemp(prefix="dbguard-chart-ns-")))
    try:
        # install() creates the governed namespace before the chart's Roles go there.
        yield install(p, helm, "--set", "namespaces={GOVERNED}")
    finally:
        p.stop()
        shutil.rmtree(p.dir, ignore_errors=True)


def test_governed_namespaces_only(namespaced: Release, tmp_path: pathlib.Path) -> None:
    other = namespaced.plane.namespace("other")
    for verb, resource, sub in (("get", "secrets", None), ("list", "guardrailpolicies.dbguard.io", None),
                                ("patch", "databaseaccesses.dbguard.io", "status"), ("create", "configmaps", None)):
        assert namespaced.can(verb, resource, namespaced.governed, sub), (verb, resource)
        assert not namespaced.can(verb, resource, other, sub), (verb, resource, "in another namespace")
        assert not namespaced.can(verb, resource, None, sub), (verb, resource, "cluster-wide")
    assert namespaced.can("list", "namespaces") and namespaced.can("watch", "namespaces")

    op = ServiceAccountOperator(namespaced, tmp_path, extra=("--namespace", namespaced.governed))
    op.start()
    try:
        plane, ns = namespaced.plane, namespaced.governed
        plane.kubectl("-n", other, "apply", "-f", "-", input=POLICY)  # not governed: left alone
        plane.kubectl("-n", ns, "apply", "-f", "-", input=POLICY)
        wait_condition(plane, "guardrailpolicy", ns, "shop-guardrails")
        op.assert_never_refused()
        assert not (get(plane, "guardrailpolicy", other, "shop-guardrails").get("status") or {})
    finally:
        op.stop()
