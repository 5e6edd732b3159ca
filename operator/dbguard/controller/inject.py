"""The proxy sidecar a DatabaseAccess puts into its pods (pure: pod + access in, new pod parts out).

The annotation contract (all under ``dbguard.io/``):

- label ``dbguard.io/access: NAME`` on the pod asks for the sidecar of DatabaseAccess NAME in the
  pod's namespace (the webhook sees no other pod);
- annotation ``dbguard.io/injected: REVISION`` is set by the webhook; a pod that already has the
  sidecar is left alone, so re-invocation and re-submission are idempotent;
- annotation ``dbguard.io/database-url-env: NAME`` picks the environment variable that receives the
  local URL (default ``DATABASE_URL``; ``""`` for none); ``PGHOST``, ``PGPORT``, ``PGDATABASE``,
  ``PGSSLMODE`` are always set so libpq clients connect to the sidecar.

The sidecar is a native sidecar (an init container with ``restartPolicy: Always``): it is ready
before the app starts and stops after it. The real credentials are mounted into the sidecar only;
the app gets a URL to ``127.0.0.1`` without a password, and the proxy knows the pod by its
ServiceAccount token (audience ``dbguard``, verified with TokenReview).
"""

from __future__ import annotations

import copy
from typing import Any

from dbguard.controller.settings import SIDECAR_NAME

TOKEN_DIR = "/var/run/secrets/dbguard.io/serviceaccount"
KUBE_API_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster clients look
CREDENTIALS_DIR = "/var/run/dbguard/database"
POLICY_DIR = "/etc/dbguard/policies"
MASKING_KEY_DIR = "/var/run/dbguard/masking"
LEDGER_KEY_DIR = "/var/run/dbguard/ledger-key"
CA_DIR = "/var/run/dbguard/database-ca"
METRICS_PORT = 9187
TOKEN_AUDIENCE = "dbguard"
VOLUME_PREFIX = "dbguard-"


class InjectionError(ValueError):
    """The pod cannot get a sidecar (the message goes back to whoever created it)."""


def _duration_seconds(text: str) -> str:
    """'200ms' / '1s' / '1.5s' -> seconds as the proxy's --policy-timeout takes them."""
    if text.endswith("ms"):
        return str(float(text[:-2]) / 1000)
    return str(float(text.rstrip("s")))


def sidecar_container(access: dict[str, Any], image: str, revision: str) -> dict[str, Any]:
    spec = access["spec"]
    db = spec["database"]
    proxy = spec.get("proxy") or {}
    port = int(proxy.get("port", 6432))
    upstream = (f"postgresql://$(DBGUARD_DATABASE_USER)@{db['host']}:{int(db.get('port', 5432))}/{db['name']}"
                f"?sslmode={db.get('sslMode', 'require')}")
    if db.get("caSecret"):  # verify-ca / verify-full against a private CA
        upstream += f"&sslrootcert={CA_DIR}/ca.crt"
    args = ["proxy", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
            "--upstream-password-file", f"{CREDENTIALS_DIR}/password",
            "--workload-token-file", f"{TOKEN_DIR}/token",
            "--metrics-listen", f"0.0.0.0:{METRICS_PORT}", "--events", "-",
            "--approvals", "kubernetes", "--access", access["metadata"]["name"]]
    for name in spec["policies"]:
        args += ["--policy", f"{POLICY_DIR}/{name}/policy.yaml"]
    if proxy.get("policyTimeout"):
        args += ["--policy-timeout", _duration_seconds(proxy["policyTimeout"])]
    if proxy.get("logLevel"):
        args += ["--log-level", proxy["logLevel"]]
    env: list[dict[str, Any]] = [{"name": "DBGUARD_DATABASE_USER", "valueFrom": {"secretKeyRef": {
        "name": db["credentialsSecret"]["name"], "key": db["credentialsSecret"].get("userKey", "username")}}}]
    ledger = (proxy.get("ledger") or {}).get("secret")
    if ledger:
        env.append({"name": "DBGUARD_LEDGER_URL", "valueFrom": {"secretKeyRef": {
            "name": ledger["name"], "key": ledger.get("key", "url")}}})
        args += ["--ledger", "env:DBGUARD_LEDGER_URL"]  # never $(VAR): the expanded URL would be in the process list
    signing = (proxy.get("ledger") or {}).get("signingKeySecret")
    mounts = [
        {"name": f"{VOLUME_PREFIX}database", "mountPath": CREDENTIALS_DIR, "readOnly": True},
        {"name": f"{VOLUME_PREFIX}token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": f"{VOLUME_PREFIX}kube-api", "mountPath": KUBE_API_DIR, "readOnly": True},
    ]
    mounts += [{"name": f"{VOLUME_PREFIX}policy-{name}", "mountPath": f"{POLICY_DIR}/{name}", "readOnly": True}
               for name in spec["policies"]]
    if db.get("caSecret"):
        mounts.append({"name": f"{VOLUME_PREFIX}database-ca", "mountPath": CA_DIR, "readOnly": True})
    if signing:  # checkpoints signed where the chain is written; only the public key verifies it
        args += ["--ledger-signing-key", f"{LEDGER_KEY_DIR}/key"]
        mounts.append({"name": f"{VOLUME_PREFIX}ledger-key", "mountPath": LEDGER_KEY_DIR, "readOnly": True})
    if proxy.get("maskingKeySecret"):
        args += ["--masking-key", f"{MASKING_KEY_DIR}/key"]
        mounts.append({"name": f"{VOLUME_PREFIX}masking-key", "mountPath": MASKING_KEY_DIR, "readOnly": True})
    resources = proxy.get("resources") or {"requests": {"cpu": "100m", "memory": "128Mi"},
                                            "limits": {"memory": "512Mi"}}
    probe = {"httpGet": {"path": "/readyz", "port": METRICS_PORT}, "periodSeconds": 5, "failureThreshold": 3}
    return {
        "name": SIDECAR_NAME,
        "image": image,
        "args": args,
        "env": env,
        "ports": [{"name": "dbguard-metrics", "containerPort": METRICS_PORT}],
        "volumeMounts": mounts,
        "resources": resources,
        "restartPolicy": "Always",  # a native sidecar: ready before the app starts, stopped after it
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": METRICS_PORT}, "periodSeconds": 10},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def sidecar_volumes(access: dict[str, Any]) -> list[dict[str, Any]]:
    spec = access["spec"]
    creds = spec["database"]["credentialsSecret"]
    volumes: list[dict[str, Any]] = [
        {"name": f"{VOLUME_PREFIX}database", "secret": {
            "secretName": creds["name"], "defaultMode": 0o400,
            "items": [{"key": creds.get("passwordKey", "password"), "path": "password"}]}},
        {"name": f"{VOLUME_PREFIX}token", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
        # What the ServiceAccount admission plugin would mount: the proxy calls TokenReview with it.
        {"name": f"{VOLUME_PREFIX}kube-api", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}},
    ]
    volumes += [{"name": f"{VOLUME_PREFIX}policy-{name}", "configMap": {"name": f"dbguard-policy-{name}"}}
                for name in spec["policies"]]
    ca = spec["database"].get("caSecret")
    if ca:
        volumes.append({"name": f"{VOLUME_PREFIX}database-ca", "secret": {
            "secretName": ca["name"], "defaultMode": 0o444, "items": [{"key": ca.get("key", "ca.crt"), "path": "ca.crt"}]}})
    signing = ((spec.get("proxy") or {}).get("ledger") or {}).get("signingKeySecret")
    if signing:
        volumes.append({"name": f"{VOLUME_PREFIX}ledger-key", "secret": {
            "secretName": signing["name"], "defaultMode": 0o400,
            "items": [{"key": signing.get("key", "ledger.key"), "path": "key"}]}})
    masking = (spec.get("proxy") or {}).get("maskingKeySecret")
    if masking:
        volumes.append({"name": f"{VOLUME_PREFIX}masking-key", "secret": {
            "secretName": masking["name"], "defaultMode": 0o400,
            "items": [{"key": masking.get("key", "key"), "path": "key"}]}})
    return volumes


def check_containers(spec: dict[str, Any], key: str = "") -> None:
    """The app's own containers may not take the sidecar's name or mount its volumes (the real
    credentials, the ServiceAccount tokens): refuse the pod, naming the container."""
    kinds = (key,) if key else ("containers", "initContainers", "ephemeralContainers")
    for kind in kinds:
        for c in spec.get(kind) or []:
            if c.get("name") == SIDECAR_NAME:
                raise InjectionError(f"container name {SIDECAR_NAME!r} is reserved for the dbguard sidecar")
            taken = sorted({m.get("name", "") for m in c.get("volumeMounts") or []
                            if m.get("name", "").startswith(VOLUME_PREFIX)})
            if taken:
                raise InjectionError(f"container {c.get('name')!r} mounts {taken}: volumes named "
                                     f"'{VOLUME_PREFIX}*' are the sidecar's alone")


def _set_env(container: dict[str, Any], values: dict[str, str]) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") not in values]
    env += [{"name": k, "value": v} for k, v in values.items()]
    container["env"] = env


def inject(pod: dict[str, Any], access: dict[str, Any], *, image: str, revision: str) -> dict[str, Any] | None:
    """The pod's spec and annotations with the sidecar, or None when it already has it."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    init = spec.get("initContainers") or []
    annotations = dict((pod.get("metadata") or {}).get("annotations") or {})
    if "dbguard.io/injected" in annotations and any(c.get("name") == SIDECAR_NAME for c in init):
        return None  # injected already (the webhook is re-invoked, or the pod re-submitted)
    check_containers(spec)
    access_spec = access["spec"]
    allowed = (access_spec.get("workloads") or {}).get("serviceAccounts") or []
    service_account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if allowed and service_account not in allowed:
        raise InjectionError(f"DatabaseAccess {access['metadata']['name']!r} admits the ServiceAccounts "
                             f"{allowed}, and this pod runs as {service_account!r}")
    names = {v.get("name") for v in spec.get("volumes") or []}
    clash = sorted(n for n in names if n and n.startswith(VOLUME_PREFIX))
    if clash:
        raise InjectionError(f"the pod already has volumes named {clash}; the '{VOLUME_PREFIX}' prefix is reserved")
    url_env = annotations.get("dbguard.io/database-url-env", "DATABASE_URL")
    db = access_spec["database"]
    port = int((access_spec.get("proxy") or {}).get("port", 6432))
    local = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGDATABASE": db["name"], "PGSSLMODE": "disable"}
    if url_env:
        local[url_env] = f"postgresql://{service_account}@127.0.0.1:{port}/{db['name']}?sslmode=disable"
    new_containers = copy.deepcopy(containers)
    for c in new_containers:
        _set_env(c, local)
    annotations["dbguard.io/injected"] = revision or "unknown"
    annotations["dbguard.io/metrics-port"] = str(METRICS_PORT)  # where the operator reads decision counts
    annotations["dbguard.io/access"] = access["metadata"]["name"]
    # The sidecar goes first: native sidecars start in order, before the app's own init containers.
    return {
        "initContainers": [sidecar_container(access, image, revision), *copy.deepcopy(init)],
        "containers": new_containers,
        "volumes": [*copy.deepcopy(spec.get("volumes") or []), *sidecar_volumes(access)],
        "annotations": annotations,
    }
