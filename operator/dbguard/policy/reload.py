"""Hot reload of the proxy's GuardrailPolicy files without dropping connections.

The operator publishes each compiled GuardrailPolicy in a ConfigMap that the sidecar mounts; the
kubelet swaps the mounted files atomically (a ``..data`` symlink). The proxy reads its policy
files every few seconds and, when their content changed, loads, validates and compiles them and
swaps the shared decider: the next statement of every open session is decided by the new
revision. A policy that does not load leaves the running revision in force (and says why). With
an OPA server, the new modules are pushed only once everything else has loaded; a push that fails
also leaves the running revision in force (modules of removed policies stay on the server unused).

Masking is different: a session resolves its masks once, at connect. When the masking rules
change, the sessions that are masked under the old or the new rules are closed (57P01,
"reconnect"), so nobody keeps seeing a column in clear that the new revision masks. Sessions that
nothing masks either way stay open.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pathlib
from typing import Any

from dbguard.audit.events import EventKind
from dbguard.errors import ConfigError
from dbguard.policy.engine import PolicyEvaluationError

log = logging.getLogger(__name__)
INTERVAL_S = 2.0


def files_digest(paths: tuple[str, ...]) -> str:
    """A digest of the files' contents ('' entries for unreadable files: a mount being swapped)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            h.update(pathlib.Path(path).read_bytes())
        except OSError:
            h.update(b"\0unreadable\0")
        h.update(b"\0")
    return h.hexdigest()


class PolicyReloader:
    def __init__(self, proxy: Any, *, interval_s: float = INTERVAL_S) -> None:
        self.proxy = proxy
        self.paths = tuple(proxy.settings.policy_files)
        self.interval_s = interval_s
        self.digest = files_digest(self.paths)
        self.reloads = 0
        self.failures = 0
        self.last_error = ""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad reload
                log.exception("policy reload failed unexpectedly")

    async def check(self) -> bool:
        """Reload when the files changed; True when a new revision is in force."""
        digest = files_digest(self.paths)
        if digest == self.digest:
            return False
        self.digest = digest
        loop = asyncio.get_running_loop()
        try:
            # Parsing and compiling take tens of milliseconds: keep them off the event loop.
            policies, bundle, engine, masking = await loop.run_in_executor(None, self._load)
        except (ConfigError, PolicyEvaluationError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            log.error("policy files changed but do not load; revision %s stays in force: %s",
                      self.proxy.decider.revision, exc)
            self.proxy.events.emit(EventKind.POLICY, {"event": "reload-failed", "revision": self.proxy.decider.revision,
                                                      "error": str(exc)[:2000]}, flush=True)
            return False
        old = self.proxy.decider.revision
        if bundle.revision == old:
            return False
        masking_changed = self._mask_rules(policies) != self._mask_rules(self.proxy.decider.bundle.policies)
        # Everything of the new revision is built (and has failed, if it fails) before anything is swapped;
        # an OPA server gets the new modules only now, just before the decider switches to them.
        if hasattr(engine, "push"):
            try:
                await loop.run_in_executor(None, engine.push, bundle)
            except PolicyEvaluationError as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.error("the OPA server did not take revision %s; %s stays in force: %s", bundle.revision,
                          self.proxy.decider.revision, exc)
                self.proxy.events.emit(EventKind.POLICY, {"event": "reload-failed",
                                                          "revision": self.proxy.decider.revision,
                                                          "error": str(exc)[:2000]}, flush=True)
                return False
        previous_engine = self.proxy.decider.engine
        self.proxy.decider.replace(bundle, engine)
        if previous_engine is not engine and hasattr(previous_engine, "close"):
            previous_engine.close()
        if masking_changed:
            self._replace_masking(masking)
        self.reloads += 1
        self.last_error = ""
        log.info("policy revision %s -> %s in force", old, bundle.revision)
        self.proxy.events.emit(EventKind.POLICY, {"event": "reloaded", "previous": old, "revision": bundle.revision,
                                                  "policies": [p.name for p in policies]}, flush=True)
        return True

    def _load(self) -> tuple[list[Any], Any, Any, Any]:
        from dbguard.policy import spec
        from dbguard.session import app

        policies = spec.load_policies(list(self.paths))
        bundle, engine = app.build_engine(self.proxy.settings, policies, push=False)  # an OPA server: not yet
        masking = app.build_masking(self.proxy.settings, policies)  # e.g. a hash rule without --masking-key fails here
        return policies, bundle, engine, masking

    @staticmethod
    def _mask_rules(policies: Any) -> tuple:
        return tuple((p.name, p.masking) for p in policies)

    def _replace_masking(self, new: Any) -> None:
        old = self.proxy.masking
        self.proxy.masking = new
        for session in list(self.proxy.sessions):
            principal = session.principal
            if principal is None:
                continue
            before = old.policy.for_groups(principal.groups) if old is not None else None
            after = new.policy.for_groups(principal.groups) if new is not None else None
            if bool(before) or bool(after):
                session._fatal("57P01", "dbguard: the masking policy changed; reconnect")  # noqa: SLF001
