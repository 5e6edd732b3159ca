"""Small, idempotent Kubernetes API helpers the reconcilers share."""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException


def apply_config_map(api: client.ApiClient, namespace: str, name: str, *, data: dict[str, str],
                     labels: dict[str, str], annotations: dict[str, str], owner: dict[str, Any] | None) -> None:
    """Create or replace a ConfigMap; a no-op when it already holds exactly this data."""
    core = client.CoreV1Api(api)
    meta = client.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations,
                               owner_references=[client.V1OwnerReference(
                                   api_version=owner["apiVersion"], kind=owner["kind"], name=owner["name"],
                                   uid=owner["uid"], controller=True, block_owner_deletion=False)] if owner else None)
    body = client.V1ConfigMap(metadata=meta, data=data)
    try:
        current = core.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body)
        return
    if current.data == data and (current.metadata.annotations or {}).get("dbguard.io/revision") == \
            annotations.get("dbguard.io/revision"):
        return
    body.metadata.resource_version = current.metadata.resource_version  # no lost update
    core.replace_namespaced_config_map(name, namespace, body)


def get_or_none(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)
