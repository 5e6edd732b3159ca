"""kopf handlers: what the operator does on each event (the logic lives in the sibling modules).

Restart safety: every handler recomputes from the object and the cluster (no in-memory state to
lose), kopf keeps its bookkeeping in ``dbguard.io/`` annotations (the status stays ours), and
resume handlers reconcile whatever changed while the operator was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import pathlib
import tempfile
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dbguard.approvals import decisions as approvals
from dbguard.approvals import notify
from dbguard.controller import access as access_mod
from dbguard.controller import certs, decision_counts, inject, metrics, policies, webhook_config
from dbguard.controller.conditions import set_condition
from dbguard.controller.kube import get_or_none
from dbguard.controller.settings import ACCESS_LABEL, GROUP, VERSION
from dbguard.controller.settings import CURRENT as CFG

log = logging.getLogger("dbguard.operator")
_api: client.ApiClient | None = None


def api() -> client.ApiClient:
    global _api
    if _api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        _api = client.ApiClient()
    return _api


def _load_tls() -> certs.WebhookTLS:
    names = ["127.0.0.1", "localhost"]
    if CFG.webhook_url_host and CFG.webhook_url_host not in names:
        names.insert(0, CFG.webhook_url_host)
    if CFG.webhook_service:
        ns, _, name = CFG.webhook_service.partition(":")[0].partition("/")
        names = [f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local", *names]
    if CFG.cert_dir:
        d = pathlib.Path(CFG.cert_dir)
        return certs.WebhookTLS(ca_cert=(d / "ca.crt").read_bytes(), ca_key=b"", cert=(d / "tls.crt").read_bytes(),
                                key=(d / "tls.key").read_bytes())
    core = client.CoreV1Api(api())
    secret_name = f"{CFG.webhook_config_name}-webhook-tls"
    current = None
    if CFG.operator_namespace:
        secret = get_or_none(core.read_namespaced_secret, secret_name, CFG.operator_namespace)
        if secret is not None and secret.data:
            current = certs.WebhookTLS.from_secret_data(secret.data)
    tls = certs.ensure(current, names)
    if CFG.operator_namespace and tls != current:
        body = client.V1Secret(metadata=client.V1ObjectMeta(name=secret_name, namespace=CFG.operator_namespace),
                               type="Opaque", data=tls.to_secret_data())
        try:
            core.create_namespaced_secret(CFG.operator_namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            core.replace_namespaced_secret(secret_name, CFG.operator_namespace, body)
    return tls


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    tls = _load_tls()
    cert_dir = pathlib.Path(tempfile.mkdtemp(prefix="dbguard-webhook-"))
    _write_tls(cert_dir, tls)
    _tls_state.update(dir=cert_dir, tls=tls)
    settings.admission.server = kopf.WebhookServer(
        addr=CFG.webhook_host, port=CFG.webhook_port, host=CFG.webhook_url_host or None,
        certfile=str(cert_dir / "tls.crt"), pkeyfile=str(cert_dir / "tls.key"), cafile=str(cert_dir / "ca.crt"))
    settings.admission.managed = None  # webhook_config writes the configurations (selectors, timeouts)
    access_mod.ensure_tokenreview_role(api())
    webhook_config.apply(api(), CFG, tls.ca_cert)
    log.info("dbguard operator: webhooks registered as %s", CFG.webhook_config_name)


_tls_state: dict[str, Any] = {}
RENEW_CHECK_S = 6 * 3600


def _write_tls(cert_dir: pathlib.Path, tls: certs.WebhookTLS) -> None:
    for name, data in (("tls.key", tls.key), ("tls.crt", tls.cert), ("ca.crt", tls.ca_cert)):
        tmp = cert_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(cert_dir / name)  # atomic: the server never reads half a certificate


@kopf.on.startup()
async def start_certificate_renewal(**_: Any) -> None:
    """Check the serving certificate every 6 h while running, not only at start: a certificate made by
    the operator is renewed 30 days before it expires, and the webhook server (which re-reads its
    files every minute) serves the new one without a restart. cert-manager's files are re-read too."""
    async def renew_forever() -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK_S)
            try:
                await asyncio.to_thread(renew_once)
            except Exception:  # noqa: BLE001 - try again at the next check
                log.exception("webhook certificate renewal failed")

    _tls_state["renewal"] = asyncio.get_running_loop().create_task(renew_forever())


@kopf.on.cleanup()
async def stop_certificate_renewal(**_: Any) -> None:
    """Stop the renewal loop with the operator: kopf would wait 5 s for it as a hung task before exiting."""
    task = _tls_state.pop("renewal", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def renew_once() -> bool:
    """Renew the files if the certificate changed; re-register the CA bundle if the CA changed."""
    old: certs.WebhookTLS | None = _tls_state.get("tls")
    tls = _load_tls()
    if old is not None and tls == old:
        return False
    _write_tls(_tls_state["dir"], tls)
    _tls_state["tls"] = tls
    if old is None or tls.ca_cert != old.ca_cert:
        webhook_config.apply(api(), CFG, tls.ca_cert)
    log.info("webhook serving certificate renewed; valid until %s", tls.leaf_expires())
    return True


# -- GuardrailPolicy ----------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "guardrailpolicies")
@kopf.on.create(GROUP, VERSION, "guardrailpolicies")
@kopf.on.update(GROUP, VERSION, "guardrailpolicies", field="spec")
@metrics.reconciles("GuardrailPolicy")
def reconcile_policy(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str, **_: Any) -> None:
    policies.reconcile(dict(body), patch, api())
    # The accesses that use the policy see the new revision (or that it broke) now, not at their timer.
    for a in access_mod.referring(api(), namespace, name):
        access_mod.refresh(api(), a)


@kopf.timer(GROUP, VERSION, "guardrailpolicies", interval=15, initial_delay=5, idle=None)
def count_decisions(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str, **_: Any) -> None:
    """status.decisions: the sum of the counters of the proxies that enforce this policy now."""
    accesses = access_mod.referring(api(), namespace, name)
    totals, read = decision_counts.count(api(), namespace, name, accesses)
    if read and totals != (body.get("status") or {}).get("decisions"):
        patch.status["decisions"] = totals


# -- DatabaseAccess -----------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "databaseaccesses")
@kopf.on.create(GROUP, VERSION, "databaseaccesses")
@kopf.on.update(GROUP, VERSION, "databaseaccesses", field="spec")
@metrics.reconciles("DatabaseAccess")
def reconcile_access(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    access_mod.ensure_tokenreview_binding(api(), dict(body))
    access_mod.ensure_requester_rbac(api(), dict(body))
    patch.status.update(access_mod.status_patch(api(), dict(body)))


@kopf.timer(GROUP, VERSION, "databaseaccesses", interval=10, initial_delay=5, idle=None)
def refresh_access(body: kopf.Body, **_: Any) -> None:
    """Secrets, policies and pods change without touching the access: look again every 10 s."""
    access_mod.refresh(api(), dict(body))


@kopf.on.delete(GROUP, VERSION, "databaseaccesses")
@metrics.reconciles("DatabaseAccess")
def release_access(namespace: str, name: str, **_: Any) -> None:
    access_mod.delete_tokenreview_binding(api(), namespace, name)


# -- the sidecar --------------------------------------------------------------------------------------


@kopf.on.mutate("", "v1", "pods", id=webhook_config.INJECT, operations=["CREATE"], labels={ACCESS_LABEL: kopf.PRESENT})
@metrics.admits(webhook_config.INJECT)
def inject_sidecar(body: kopf.Body, patch: kopf.Patch, dryrun: bool, warnings: list[str], **_: Any) -> None:
    pod = dict(body)
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace", "")
    wanted = (meta.get("labels") or {}).get(ACCESS_LABEL, "")
    found = get_or_none(client.CustomObjectsApi(api()).get_namespaced_custom_object, GROUP, VERSION, namespace,
                        "databaseaccesses", wanted)
    if found is None:
        raise kopf.AdmissionError(f"dbguard: the pod asks for DatabaseAccess {wanted!r} (label {ACCESS_LABEL}), "
                                  f"which does not exist in namespace {namespace!r}", code=403)
    status = found.get("status") or {}
    if not status.get("ready"):
        conditions = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        why = conditions[0].get("message", "") if conditions else "not reconciled yet"
        raise kopf.AdmissionError(f"dbguard: DatabaseAccess {wanted!r} is not ready: {why}", code=403)
    try:
        changes = inject.inject(pod, found, image=(found["spec"].get("proxy") or {}).get("image") or CFG.proxy_image,
                                revision=status.get("policyRevision", ""))
    except inject.InjectionError as exc:
        raise kopf.AdmissionError(f"dbguard: {exc}", code=403) from exc
    if changes is None:
        return  # already injected (re-invocation)
    patch.spec["initContainers"] = changes["initContainers"]
    patch.spec["containers"] = changes["containers"]
    patch.spec["volumes"] = changes["volumes"]
    patch.metadata["annotations"] = changes["annotations"]


# -- ApprovalRequest ----------------------------------------------------------------------------------


@kopf.on.mutate(GROUP, VERSION, "approvalrequests", id=webhook_config.STAMP, operations=["UPDATE"])
@metrics.admits(webhook_config.STAMP)
def stamp_approval(old: kopf.Body | None, new: kopf.Body, userinfo: dict[str, Any], patch: kopf.Patch,
                   **_: Any) -> None:
    spec = approvals.stamp(dict(old) if old is not None else None, dict(new), userinfo,
                           datetime.datetime.now(datetime.UTC))
    if spec is not None:
        for key, value in spec.items():
            if (new.get("spec") or {}).get(key) != value:
                patch.spec[key] = value
        for key in (new.get("spec") or {}):
            if key not in spec:
                patch.spec[key] = None


@kopf.on.validate("", "v1", "pods", id=webhook_config.EPHEMERAL, subresource="ephemeralcontainers",
                  operations=["UPDATE"], labels={ACCESS_LABEL: kopf.PRESENT})
@metrics.admits(webhook_config.EPHEMERAL)
def guard_ephemeral_containers(new: kopf.Body, **_: Any) -> None:
    try:
        inject.check_containers(dict(new.get("spec") or {}), "ephemeralContainers")
    except inject.InjectionError as exc:
        raise kopf.AdmissionError(f"dbguard: {exc}", code=403) from exc


@kopf.on.validate(GROUP, VERSION, "approvalrequests", id=webhook_config.GUARD)
@metrics.admits(webhook_config.GUARD)
def guard_approval(old: kopf.Body | None, new: kopf.Body, userinfo: dict[str, Any], **_: Any) -> None:
    try:
        approvals.check(dict(old) if old is not None else None, dict(new), userinfo,
                        datetime.datetime.now(datetime.UTC))
    except approvals.Refused as exc:
        raise kopf.AdmissionError(f"dbguard: {exc}", code=403) from exc


def _approval_status(body: kopf.Body, now: datetime.datetime) -> dict[str, Any] | None:
    status = dict(body.get("status") or {})
    phase, decided_by, reason = approvals.phase_of(dict(body), now)
    if phase == status.get("phase"):
        return None
    new: dict[str, Any] = {"phase": phase, "observedGeneration": body["metadata"].get("generation")}
    if decided_by:
        new["decidedBy"] = decided_by
        new["decidedAt"] = now.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    message = {"Pending": "waiting for approvers", "Approved": f"approved by {decided_by}" + (f": {reason}" if reason
               else ""), "Denied": f"denied by {decided_by}" + (f": {reason}" if reason else ""),
               "Cancelled": f"cancelled by {decided_by}", "Expired": "expired before it was decided or run"}[phase]
    new["conditions"] = set_condition(status.get("conditions"), "Decided", phase != "Pending", phase, message,
                                      body["metadata"].get("generation"))
    return new


@kopf.on.resume(GROUP, VERSION, "approvalrequests")
@kopf.on.create(GROUP, VERSION, "approvalrequests")
@kopf.on.update(GROUP, VERSION, "approvalrequests", field="spec")
@metrics.reconciles("ApprovalRequest")
def reconcile_approval(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    new = _approval_status(body, datetime.datetime.now(datetime.UTC))
    if new is not None:
        patch.status.update(new)
        metrics.approval_phase(new["phase"])
        _notify_decided(body, new)


_notifier: notify.Notifier | None = None


def _notify_decided(body: Any, status: dict[str, Any]) -> None:
    """Tell approvers' channel that a request was decided, cancelled or expired (creation is the proxy's)."""
    global _notifier
    if not CFG.approval_notify_url or status["phase"] == "Pending":
        return
    if _notifier is None:
        _notifier = notify.Notifier(CFG.approval_notify_url)
    meta = body["metadata"]
    _notifier.send(notify.decided_text(f"{meta['namespace']}/{meta['name']}", status["phase"],
                                       status.get("decidedBy", "")), request=meta["name"], phase=status["phase"])


@kopf.daemon(GROUP, VERSION, "approvalrequests", cancellation_timeout=5,
             when=lambda status, **_: (status or {}).get("phase", "Pending") not in approvals.FINAL_PHASES)
async def expire_approval(body: kopf.Body, namespace: str, name: str, stopped: kopf.DaemonStopped,
                          **_: Any) -> None:
    """Sleep until the request expires, then mark it Expired unless it was decided or run meanwhile."""
    expires = (body.get("spec") or {}).get("expiresAt")
    if not expires:
        return
    while not stopped:
        delay = (approvals.parse_time(expires) - datetime.datetime.now(datetime.UTC)).total_seconds()
        if delay <= 0:
            break
        await stopped.wait(min(delay + 0.05, 60))  # wakes at once when the operator stops
    if stopped:
        return
    custom = client.CustomObjectsApi(api())
    current = await asyncio.to_thread(get_or_none, custom.get_namespaced_custom_object, GROUP, VERSION, namespace,
                                      "approvalrequests", name)
    if current is None:
        return
    new = _approval_status(kopf.Body(current), datetime.datetime.now(datetime.UTC))
    if new is not None:
        def expire() -> None:  # in one thread: the write ends this daemon, whose task kopf then cancels
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "approvalrequests", name,
                                                         {"status": new})
            metrics.approval_phase(new["phase"])
            _notify_decided(current, new)

        await asyncio.to_thread(expire)
