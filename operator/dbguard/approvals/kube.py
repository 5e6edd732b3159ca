"""The Kubernetes approval store: ApprovalRequest resources in the proxy's namespace.

The proxy's ServiceAccount may create ApprovalRequests and write their status (the operator
grants it, see controller/access.py); it never decides. A request's phase is computed from its
``spec.approvals``, which only the admission webhook writes from the API server's user info, so a
workload that writes status itself cannot approve anything. Running once is a compare-and-swap on
the status (``resourceVersion``): of two proxies claiming the same approval, one gets a conflict.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dbguard.approvals.store import NewRequest, Request, ThreadedStore, with_outcome

GROUP, VERSION, PLURAL = "dbguard.io", "v1alpha1", "approvalrequests"
FINGERPRINT_LABEL = "dbguard.io/fingerprint"  # a label value holds 63 characters: the first 40 hex digits
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_namespace() -> str:
    try:
        return pathlib.Path(NAMESPACE_FILE).read_text().strip()
    except OSError:
        return "default"


class KubeStore(ThreadedStore):
    kind = "kubernetes"

    def __init__(self, namespace: str = "", *, kubeconfig: str = "") -> None:
        self.namespace = namespace or default_namespace()
        if kubeconfig or os.environ.get("KUBECONFIG"):
            self.api = config.new_client_from_config(config_file=kubeconfig or os.environ["KUBECONFIG"])
        else:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            self.api = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self.api)

    def find_sync(self, fingerprint: str) -> list[Request]:
        found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                          label_selector=f"{FINGERPRINT_LABEL}={fingerprint[:40]}")
        items = [i for i in found.get("items", []) if (i.get("spec") or {}).get("fingerprint") == fingerprint]
        items.sort(key=lambda i: (i["metadata"].get("creationTimestamp", ""), i["metadata"]["name"]), reverse=True)
        return [Request(i["metadata"]["name"], i) for i in items]

    def create_sync(self, new: NewRequest) -> Request:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApprovalRequest",
                "metadata": {"name": new.name(), "labels": {FINGERPRINT_LABEL: new.fingerprint[:40],
                                                            "app.kubernetes.io/managed-by": "dbguard"}},
                "spec": new.to_spec(datetime.datetime.now(datetime.UTC))}
        created = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        return Request(created["metadata"]["name"], created)

    def get_sync(self, name: str) -> Request | None:
        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return Request(name, obj)

    def claim_sync(self, name: str, proxy: str) -> bool:
        for _ in range(10):  # conflicts with the operator's own status writes are retried
            current = self.get_sync(name)
            if current is None or current.phase() != "Approved":
                return False
            status: dict[str, Any] = dict(current.doc.get("status") or {})
            status.update(phase="Executed", execution={"at": _iso(datetime.datetime.now(datetime.UTC)), "proxy": proxy})
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApprovalRequest",
                    "metadata": {"name": name, "resourceVersion": current.doc["metadata"]["resourceVersion"]},
                    "spec": current.doc["spec"], "status": status}
            try:
                self.custom.replace_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name, body)
                return True
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return False

    def finish_sync(self, name: str, *, rows: int | None, error: str | None, ledger_entry: int | None) -> None:
        current = self.get_sync(name)
        if current is None:
            return
        execution = with_outcome((current.doc.get("status") or {}).get("execution") or {}, rows=rows, error=error,
                                 ledger_entry=ledger_entry)
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name,
                                                          {"status": {"execution": execution}})

    def approve_hint(self, name: str, namespace: str = "") -> str:
        return (f"kubectl -n {self.namespace} patch approvalrequest {name} --type merge "
                "-p '{\"spec\":{\"decision\":\"Approved\",\"reason\":\"...\"}}'")
