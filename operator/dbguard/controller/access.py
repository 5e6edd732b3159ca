"""DatabaseAccess: check what it refers to, grant its workloads TokenReview, report its pods.

Ready means a pod created now gets a working sidecar: every Secret it refers to has its keys (the
ledger's signing key is an Ed25519 key) and every policy compiled. The status also names the policy revision in force (a digest of the
policies' revisions) and how many pods carry the sidecar.

The sidecar proves its pod's identity with TokenReview, which needs ``create tokenreviews`` (a
cluster-scoped permission). The operator binds the ``dbguard-tokenreview`` ClusterRole to the
access's ServiceAccounts (or to every ServiceAccount of the namespace when none are listed). That
ClusterRoleBinding is state outside the namespace, which owner references cannot clean up: it is
the one place the operator uses a finalizer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbguard.controller.conditions import condition_status, set_condition
from dbguard.controller.kube import get_or_none
from dbguard.controller.settings import ACCESS_LABEL, GROUP, SIDECAR_NAME, VERSION

log = logging.getLogger(__name__)
TOKENREVIEW_ROLE = "dbguard-tokenreview"


def binding_name(namespace: str, name: str) -> str:
    return f"dbguard-tokenreview-{namespace}-{name}"[:253]


def combined_revision(revisions: list[str]) -> str:
    return hashlib.sha256(",".join(revisions).encode()).hexdigest()[:12] if revisions else ""


def referred_secrets(spec: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(Secret name, keys the sidecar mounts from it) for every Secret an access refers to: a
    missing one would leave its pods unable to start (the kubelet cannot mount it)."""
    db, proxy = spec["database"], spec.get("proxy") or {}
    creds = db["credentialsSecret"]
    refs = [(creds["name"], [creds.get("userKey", "username"), creds.get("passwordKey", "password")])]
    if db.get("caSecret"):
        refs.append((db["caSecret"]["name"], [db["caSecret"].get("key", "ca.crt")]))
    ledger = proxy.get("ledger") or {}
    if ledger.get("secret"):
        refs.append((ledger["secret"]["name"], [ledger["secret"].get("key", "url")]))
    if ledger.get("signingKeySecret"):
        refs.append((ledger["signingKeySecret"]["name"], [ledger["signingKeySecret"].get("key", "ledger.key")]))
    if proxy.get("maskingKeySecret"):
        refs.append((proxy["maskingKeySecret"]["name"], [proxy["maskingKeySecret"].get("key", "key")]))
    return refs


def _signing_key_problem(secret: client.V1Secret, ref: dict[str, Any]) -> str:
    """Why the ledger's signing key would stop the sidecar from starting ("" if it would not)."""
    key = ref.get("key", "ledger.key")
    try:
        pem = base64.b64decode(secret.data[key])
        if not isinstance(serialization.load_pem_private_key(pem, password=None), Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        return (f"Secret {ref['name']!r} key {key!r} is not an unencrypted Ed25519 private key in PEM "
                f"(dbguard audit keygen makes one): {exc}")
    return ""


def check(api: client.ApiClient, access: dict[str, Any]) -> tuple[bool, str, str, str]:
    """(ready, reason, message, policy revision) from the Secret and the policies referred to."""
    namespace = access["metadata"]["namespace"]
    spec = access.get("spec") or {}
    secrets: dict[str, client.V1Secret] = {}
    for name, keys in referred_secrets(spec):
        secret = secrets[name] = get_or_none(client.CoreV1Api(api).read_namespaced_secret, name, namespace)
        if secret is None:
            return False, "SecretNotFound", f"Secret {name!r} not found in namespace {namespace}", ""
        missing = [k for k in keys if k not in (secret.data or {})]
        if missing:
            return False, "SecretKeyMissing", f"Secret {name!r} has no key(s) {missing}", ""
    signing = ((spec.get("proxy") or {}).get("ledger") or {}).get("signingKeySecret")
    if signing:
        problem = _signing_key_problem(secrets[signing["name"]], signing)
        if problem:
            return False, "SecretInvalid", problem, ""
    revisions = []
    custom = client.CustomObjectsApi(api)
    for name in spec["policies"]:
        policy = get_or_none(custom.get_namespaced_custom_object, GROUP, VERSION, namespace, "guardrailpolicies", name)
        if policy is None:
            return False, "PolicyNotFound", f"GuardrailPolicy {name!r} not found in namespace {namespace}", ""
        if condition_status(policy, "Ready") != "True" or not (policy.get("status") or {}).get("revision"):
            return False, "PolicyNotReady", f"GuardrailPolicy {name!r} is not Ready (see its status)", ""
        revisions.append(f"{name}={policy['status']['revision']}")
    revision = combined_revision(revisions)
    return True, "Ready", f"policies {', '.join(revisions)}", revision


def injected_pods(api: client.ApiClient, namespace: str, name: str) -> int:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"{ACCESS_LABEL}={name}")
    return sum(1 for p in pods.items
               if "dbguard.io/injected" in (p.metadata.annotations or {})
               and any(c.name == SIDECAR_NAME for c in p.spec.init_containers or []))


def ensure_tokenreview_binding(api: client.ApiClient, access: dict[str, Any]) -> None:
    namespace, name = access["metadata"]["namespace"], access["metadata"]["name"]
    accounts = ((access.get("spec") or {}).get("workloads") or {}).get("serviceAccounts") or []
    subjects = ([client.RbacV1Subject(kind="ServiceAccount", name=sa, namespace=namespace) for sa in accounts]
                or [client.RbacV1Subject(kind="Group", name=f"system:serviceaccounts:{namespace}",
                                         api_group="rbac.authorization.k8s.io")])
    body = client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name=binding_name(namespace, name), labels={
            "app.kubernetes.io/managed-by": "dbguard", "dbguard.io/access-namespace": namespace,
            "dbguard.io/access": name}),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=TOKENREVIEW_ROLE),
        subjects=subjects)
    rbac = client.RbacAuthorizationV1Api(api)
    try:
        rbac.create_cluster_role_binding(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_cluster_role_binding(body.metadata.name, body)


REQUESTER_ROLE = "dbguard-approval-requester"


def ensure_requester_rbac(api: client.ApiClient, access: dict[str, Any]) -> None:
    """Let the access's workloads (their sidecars) create ApprovalRequests and record executions.

    Namespaced and owned by the access, so it goes when the access goes. Deciding is not in it:
    decisions are stamped from the API server's user info and checked by the webhook.
    """
    namespace, name = access["metadata"]["namespace"], access["metadata"]["name"]
    owner = [client.V1OwnerReference(api_version=f"{GROUP}/{VERSION}", kind="DatabaseAccess", name=name,
                                     uid=access["metadata"]["uid"], block_owner_deletion=False)]
    labels = {"app.kubernetes.io/managed-by": "dbguard"}
    rbac = client.RbacAuthorizationV1Api(api)
    role = client.V1Role(
        metadata=client.V1ObjectMeta(name=REQUESTER_ROLE, namespace=namespace, labels=labels),
        rules=[client.V1PolicyRule(api_groups=[GROUP], resources=["approvalrequests"],
                                   verbs=["create", "get", "list", "watch"]),
               client.V1PolicyRule(api_groups=[GROUP], resources=["approvalrequests/status"],
                                   verbs=["get", "update", "patch"])])
    try:
        rbac.create_namespaced_role(namespace, role)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_namespaced_role(REQUESTER_ROLE, namespace, role)
    accounts = ((access.get("spec") or {}).get("workloads") or {}).get("serviceAccounts") or []
    subjects = ([client.RbacV1Subject(kind="ServiceAccount", name=sa, namespace=namespace) for sa in accounts]
                or [client.RbacV1Subject(kind="Group", name=f"system:serviceaccounts:{namespace}",
                                         api_group="rbac.authorization.k8s.io")])
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name=f"{REQUESTER_ROLE}-{name}", namespace=namespace, labels=labels,
                                     owner_references=owner),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=REQUESTER_ROLE),
        subjects=subjects)
    try:
        rbac.create_namespaced_role_binding(namespace, binding)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_namespaced_role_binding(binding.metadata.name, namespace, binding)


def delete_tokenreview_binding(api: client.ApiClient, namespace: str, name: str) -> None:
    try:
        client.RbacAuthorizationV1Api(api).delete_cluster_role_binding(binding_name(namespace, name))
    except ApiException as exc:
        if exc.status != 404:
            raise


def ensure_tokenreview_role(api: client.ApiClient) -> None:
    """The ClusterRole the bindings refer to (the chart installs it too; this keeps local runs whole)."""
    role = client.V1ClusterRole(
        metadata=client.V1ObjectMeta(name=TOKENREVIEW_ROLE, labels={"app.kubernetes.io/managed-by": "dbguard"}),
        rules=[client.V1PolicyRule(api_groups=["authentication.k8s.io"], resources=["tokenreviews"],
                                   verbs=["create"])])
    try:
        client.RbacAuthorizationV1Api(api).create_cluster_role(role)
    except ApiException as exc:
        if exc.status != 409:
            raise


def status_patch(api: client.ApiClient, access: dict[str, Any]) -> dict[str, Any]:
    """The status this access should have now."""
    meta = access["metadata"]
    ready, reason, message, revision = check(api, access)
    status = access.get("status") or {}
    return {
        "observedGeneration": meta.get("generation"),
        "ready": ready,
        "policyRevision": revision if ready else status.get("policyRevision", ""),
        "injectedPods": injected_pods(api, meta["namespace"], meta["name"]),
        "conditions": set_condition(status.get("conditions"), "Ready", ready, reason, message, meta.get("generation")),
    }


def changed(current: dict[str, Any], new: dict[str, Any]) -> bool:
    def strip(status: dict[str, Any]) -> dict[str, Any]:
        out = dict(status)
        out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                             for c in status.get("conditions") or []]
        return out

    return strip(current or {}) != strip(new)


def referring(api: client.ApiClient, namespace: str, policy: str) -> list[dict[str, Any]]:
    """The DatabaseAccesses of a namespace that use a policy."""
    found = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, "databaseaccesses")
    return [a for a in found.get("items", []) if policy in ((a.get("spec") or {}).get("policies") or [])]


def refresh(api: client.ApiClient, access: dict[str, Any]) -> None:
    """Write the status when it changed (for the timer and for policy changes)."""
    new = status_patch(api, access)
    if changed(access.get("status") or {}, new):
        meta = access["metadata"]
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], "databaseaccesses", meta["name"], {"status": new})
