"""A real OPA server as the policy engine, through opa-python-client.

The proxy pushes the compiled bundle (library module, raw modules, rule data) to the server at
start and queries ``data.dbguard.decision`` per statement. Anything but a decision in time is a
PolicyEvaluationError, which the decider turns into a refusal.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import Any

import requests
from opa_client import OpaClient

from dbguard.policy.compile import CompiledBundle
from dbguard.policy.decision import Decision
from dbguard.policy.engine import PolicyEvaluationError, decision_from_result

log = logging.getLogger(__name__)


class OpaServerEngine:
    def __init__(self, bundle: CompiledBundle, url: str, *, timeout_s: float = 1.0, push: bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyEvaluationError(f"--opa-url must be http(s)://host:port, got {url!r}")
        self.revision = bundle.revision
        self._client = OpaClient(host=parts.hostname, port=parts.port or 8181, ssl=parts.scheme == "https",
                                 timeout=timeout_s, retries=0)
        self._bundle: CompiledBundle | None = bundle if push else None
        if push:
            self.push(bundle)

    def push(self, bundle: CompiledBundle) -> None:
        """Install the bundle's modules and data on the server (idempotent: same ids each time)."""
        try:
            for name, text in bundle.modules.items():
                self._client.update_policy_from_string(text, _policy_id(name), rego_compat=False)
            self._client.update_or_create_data(bundle.data["dbguard"], "dbguard")
            self._bundle = bundle  # pushed again if the server is found empty (restarted)
        except (requests.RequestException, Exception) as exc:  # noqa: BLE001 - the client raises its own types
            log.warning("cannot install the policy bundle on OPA: %s", exc)
            raise PolicyEvaluationError(f"cannot install the policy bundle on OPA ({type(exc).__name__})") from exc

    def evaluate(self, input_doc: dict[str, Any]) -> Decision:
        answer = self._query(input_doc)
        if "result" not in answer and self._bundle is not None:
            # An OPA server that restarted has lost the pushed policy: push it again, once, and ask again.
            log.warning("OPA returned no decision; pushing policy revision %s to it again", self.revision)
            self.push(self._bundle)
            answer = self._query(input_doc)
        if "result" not in answer:
            raise PolicyEvaluationError("OPA returned no decision (undefined)")
        return decision_from_result(answer["result"], self.revision)

    def _query(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._client.query_rule(input_doc, "dbguard", "decision")
        except requests.RequestException as exc:
            log.warning("OPA server did not answer: %s", exc)  # the address stays in the log, not in client errors
            raise PolicyEvaluationError(f"the OPA server did not answer ({type(exc).__name__})") from exc

    def close(self) -> None:
        self._client.close_connection()


def _policy_id(module_name: str) -> str:
    return "dbguard-" + module_name.replace("/", "-").removesuffix(".rego")
