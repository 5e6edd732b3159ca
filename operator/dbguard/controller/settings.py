"""What the operator process was started with (``dbguard operator`` flags)."""

from __future__ import annotations

import dataclasses

GROUP = "dbguard.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ACCESS_LABEL = "dbguard.io/access"  # pods labelled with a DatabaseAccess name get the sidecar
SIDECAR_NAME = "dbguard-proxy"
DEFAULT_IMAGE = "ghcr.io/dbguard/dbguard:0.1.0"


@dataclasses.dataclass(slots=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    proxy_image: str = DEFAULT_IMAGE
    webhook_host: str = "0.0.0.0"  # where the webhook server listens
    webhook_port: int = 9443
    webhook_url_host: str = ""  # out of cluster: the API server calls https://HOST:PORT/<webhook>
    webhook_service: str = ""  # in cluster: NAMESPACE/NAME[:PORT] of the Service in front of the operator
    webhook_config_name: str = "dbguard"  # the Mutating/ValidatingWebhookConfiguration this operator owns
    operator_namespace: str = ""  # where the webhook TLS Secret is kept ("" keeps it in memory)
    cert_dir: str = ""  # serve tls.crt/tls.key/ca.crt from here (cert-manager) instead of making them
    approval_notify_url: str = ""  # Slack-compatible webhook for approval requests (off by default)


CURRENT = OperatorSettings()
