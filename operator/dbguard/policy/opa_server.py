"""A real OPA server as the policy engine, through opa-python-client.

The proxy pushes the compiled bundle (library module, raw modules, rule data) to the server at
start and queries ``data.dbguard.decision`` per statement. Anything but a decision in time is a
PolicyEvaluationError, which the decider turns into a refusal.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import requests
from opa_client import OpaClient

from dbguard.policy.compile import CompiledBundle
from dbguard.policy.decision import Decision
from dbguard.policy.engine import PolicyEvaluationError, decision_from_result


class OpaServerEngine:
    def __init__(self, bundle: CompiledBundle, url: str, *, timeout_s: float = 1.0, push: bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyEvaluationError(f"--opa-url must be http(s)://host:port, got {url!r}")
        self.revision = bundle.revision
        self._client = OpaClient(host=parts.hostname, port=parts.port or 8181, ssl=parts.scheme == "https",
                                 timeout=timeout_s, retries=0)
        if push:
            self.push(bundle)

    def push(self, bundle: CompiledBundle) -> None:
        """Install the bundle's modules and data on the server (idempotent: same ids each time)."""
        try:
            for name, text in bundle.modules.items():
                self._client.update_policy_from_string(text, _policy_id(name), rego_compat=False)
            self._client.update_or_create_data(bundle.data["dbguard"], "dbguard")
        except (requests.RequestException, Exception) as exc:  # noqa: BLE001 - the client raises its own types
            raise PolicyEvaluationError(f"cannot install the policy bundle on OPA: {exc}") from exc

    def evaluate(self, input_doc: dict[str, Any]) -> Decision:
        try:
            answer = self._client.query_rule(input_doc, "dbguard", "decision")
        except requests.RequestException as exc:
            raise PolicyEvaluationError(f"OPA server did not answer: {exc}") from exc
        if "result" not in answer:
            raise PolicyEvaluationError("OPA returned no decision (undefined)")
        return decision_from_result(answer["result"], self.revision)

    def close(self) -> None:
        self._client.close_connection()


def _policy_id(module_name: str) -> str:
    return "dbguard-" + module_name.replace("/", "-").removesuffix(".rego")
