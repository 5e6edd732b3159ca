"""``dbguard operator``: run the kopf operator with its webhooks."""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Reconcile GuardrailPolicy, DatabaseAccess and ApprovalRequest resources (group dbguard.io):
compile each GuardrailPolicy with the proxy's own compiler and publish it in a ConfigMap that the
sidecars hot-reload; keep DatabaseAccess status (ready, injected pods, policy revision); inject
the dbguard proxy sidecar into pods labelled dbguard.io/access=NAME through a mutating admission
webhook; stamp and check approval decisions through admission webhooks; expire requests.

The operator reaches the API server with its in-cluster ServiceAccount, or $KUBECONFIG. The
webhooks are served over TLS with a certificate it makes and renews itself (kept in the Secret
NAME-webhook-tls of --operator-namespace), or one given in --cert-dir (cert-manager).

examples:
  # in a cluster (what the Helm chart runs)
  dbguard operator --operator-namespace dbguard-system --webhook-service dbguard-system/dbguard-webhook:443 \\
      --health-listen 0.0.0.0:8080 --metrics-listen 0.0.0.0:8081
  # on a laptop against a cluster whose API server can reach this machine
  dbguard operator --webhook-listen 127.0.0.1:9443 --webhook-url-host 127.0.0.1 --namespace shop
"""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", action="append", default=[], metavar="NS",
                   help="govern only this namespace (repeatable; default: every namespace)")
    p.add_argument("--proxy-image", default="", metavar="IMAGE",
                   help="image of the injected proxy sidecar (a DatabaseAccess may override it)")
    p.add_argument("--webhook-listen", type=_host_port, default=("0.0.0.0", 9443), metavar="HOST:PORT",
                   help="where the admission webhook server listens (default 0.0.0.0:9443)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--webhook-service", default="", metavar="NS/NAME[:PORT]",
                       help="the Service in front of the operator, which the API server calls")
    where.add_argument("--webhook-url-host", default="", metavar="HOST",
                       help="out of cluster: the API server calls https://HOST:PORT directly")
    p.add_argument("--webhook-config-name", default="dbguard", metavar="NAME",
                   help="name of the Mutating/ValidatingWebhookConfiguration the operator owns (default dbguard)")
    p.add_argument("--operator-namespace", default="", metavar="NS",
                   help="namespace of the operator: keeps the webhook certificate in a Secret there, and is "
                        "never injected")
    p.add_argument("--cert-dir", default="", metavar="DIR",
                   help="serve tls.crt, tls.key and ca.crt from DIR (e.g. cert-manager) instead of making them")
    p.add_argument("--health-listen", type=_host_port, default=None, metavar="HOST:PORT",
                   help="serve kopf's liveness probe on http://HOST:PORT/healthz (default: off)")
    p.add_argument("--metrics-listen", type=_host_port, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics: reconciliations, webhook "
                        "reviews and their latency, approval phases (default: off)")
    p.add_argument("--approval-notify-url", default="", metavar="URL",
                   help="Slack-compatible webhook called when an approval request is decided, cancelled or expires "
                        "(default: off; proxies notify on creation with their own flag)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    from dbguard.controller import settings

    cfg = settings.CURRENT
    cfg.namespaces = tuple(args.namespace)
    cfg.proxy_image = args.proxy_image or settings.DEFAULT_IMAGE
    cfg.webhook_host, cfg.webhook_port = args.webhook_listen
    cfg.webhook_url_host = args.webhook_url_host
    cfg.webhook_service = args.webhook_service
    cfg.webhook_config_name = args.webhook_config_name
    cfg.operator_namespace = args.operator_namespace
    cfg.cert_dir = args.cert_dir
    cfg.approval_notify_url = args.approval_notify_url
    from dbguard.controller import handlers, metrics  # noqa: F401 - importing handlers registers them with kopf

    if args.metrics_listen:
        metrics.serve(*args.metrics_listen)

    liveness = f"http://{args.health_listen[0]}:{args.health_listen[1]}/healthz" if args.health_listen else None
    kopf.run(standalone=True, clusterwide=not cfg.namespaces, namespaces=list(cfg.namespaces),
             liveness_endpoint=liveness)
    return 0
