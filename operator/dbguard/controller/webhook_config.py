"""The Mutating/ValidatingWebhookConfiguration this operator owns, with each choice on purpose.

kopf can manage webhook configurations, but not their ``namespaceSelector``, ``timeoutSeconds``
or ``reinvocationPolicy``, which are the choices that decide what an operator outage does. So the
operator writes them itself:

- ``inject-sidecar`` (pods, CREATE): ``objectSelector`` ``dbguard.io/access`` exists, so only pods
  that ask for a DatabaseAccess are ever sent; the operator's own namespace and the kube-*
  namespaces are excluded, as is any namespace labelled ``dbguard.io/injection: disabled``.
  ``failurePolicy: Fail``: a pod that asks for governed database access is not created without
  its proxy (it would have no credentials anyway, and a silent start without governance is the
  worse failure). Pods that do not ask are never affected by the operator being down.
- ``stamp-approval`` (mutating) and ``guard-approval`` (validating) on ApprovalRequests:
  ``failurePolicy: Fail`` — a decision that cannot be checked is not recorded (fail closed).
  Only the ApprovalRequest resource is intercepted, so nothing else waits on them.
- ``timeoutSeconds: 10`` (not the 30 s maximum): an unreachable operator fails a request fast.
"""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbguard.controller.settings import ACCESS_LABEL, GROUP, VERSION, OperatorSettings

INJECT = "inject-sidecar"
STAMP = "stamp-approval"
GUARD = "guard-approval"
EPHEMERAL = "guard-ephemeral-containers"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


def _client_config(cfg: OperatorSettings, webhook_id: str, ca_pem: bytes) -> dict[str, Any]:
    bundle = base64.b64encode(ca_pem).decode()
    if cfg.webhook_service:
        ref, _, port = cfg.webhook_service.partition(":")
        namespace, _, name = ref.partition("/")
        return {"service": {"namespace": namespace, "name": name, "port": int(port or 443), "path": f"/{webhook_id}"},
                "caBundle": bundle}
    return {"url": f"https://{cfg.webhook_url_host}:{cfg.webhook_port}/{webhook_id}", "caBundle": bundle}


def _namespace_selector(cfg: OperatorSettings) -> dict[str, Any]:
    excluded = [*SYSTEM_NAMESPACES, *([cfg.operator_namespace] if cfg.operator_namespace else [])]
    exprs: list[dict[str, Any]] = [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
        {"key": "dbguard.io/injection", "operator": "NotIn", "values": ["disabled"]},
    ]
    if cfg.namespaces:
        exprs.append({"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(cfg.namespaces)})
    return {"matchExpressions": exprs}


def _approval_namespaces(cfg: OperatorSettings) -> dict[str, Any]:
    if not cfg.namespaces:
        return {}
    return {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                  "values": list(cfg.namespaces)}]}


def build(cfg: OperatorSettings, ca_pem: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mutating, validating) configuration bodies."""
    common = {"sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 10,
              "matchPolicy": "Equivalent", "failurePolicy": "Fail"}
    approval_rule = {"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": ["approvalrequests"],
                     "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}
    labels = {"app.kubernetes.io/managed-by": "dbguard"}
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": cfg.webhook_config_name, "labels": labels},
        "webhooks": [
            {**common, "name": f"{INJECT}.{GROUP}", "clientConfig": _client_config(cfg, INJECT, ca_pem),
             "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"],
                        "scope": "Namespaced"}],
             "objectSelector": {"matchExpressions": [{"key": ACCESS_LABEL, "operator": "Exists"}]},
             "namespaceSelector": _namespace_selector(cfg), "reinvocationPolicy": "IfNeeded"},
            {**common, "name": f"{STAMP}.{GROUP}", "clientConfig": _client_config(cfg, STAMP, ca_pem),
             "rules": [approval_rule], "namespaceSelector": _approval_namespaces(cfg), "reinvocationPolicy": "Never"},
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": cfg.webhook_config_name, "labels": labels},
        "webhooks": [
            {**common, "name": f"{GUARD}.{GROUP}", "clientConfig": _client_config(cfg, GUARD, ca_pem),
             "rules": [approval_rule], "namespaceSelector": _approval_namespaces(cfg)},
            # kubectl debug adds ephemeral containers to a running pod: they may not mount the sidecar's
            # credentials either. Same scope as injection: only pods that carry the access label.
            {**common, "name": f"{EPHEMERAL}.{GROUP}", "clientConfig": _client_config(cfg, EPHEMERAL, ca_pem),
             "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/ephemeralcontainers"],
                        "operations": ["UPDATE"], "scope": "Namespaced"}],
             "objectSelector": {"matchExpressions": [{"key": ACCESS_LABEL, "operator": "Exists"}]},
             "namespaceSelector": _namespace_selector(cfg)},
        ],
    }
    return mutating, validating


def apply(api: client.ApiClient, cfg: OperatorSettings, ca_pem: bytes) -> None:
    """Create or replace both configurations (idempotent)."""
    mutating, validating = build(cfg, ca_pem)
    adm = client.AdmissionregistrationV1Api(api)
    for body, read, create, replace in (
        (mutating, adm.read_mutating_webhook_configuration, adm.create_mutating_webhook_configuration,
         adm.replace_mutating_webhook_configuration),
        (validating, adm.read_validating_webhook_configuration, adm.create_validating_webhook_configuration,
         adm.replace_validating_webhook_configuration),
    ):
        name = body["metadata"]["name"]
        try:
            current = read(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            create(body)
            continue
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        replace(name, body)


def remove(api: client.ApiClient, name: str) -> None:
    adm = client.AdmissionregistrationV1Api(api)
    for delete in (adm.delete_mutating_webhook_configuration, adm.delete_validating_webhook_configuration):
        try:
            delete(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
