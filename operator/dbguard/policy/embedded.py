"""The embedded Rego engine: regopy (rego-cpp, maintained by its authors). See docs/policy-engine.md."""

from __future__ import annotations

import re
import threading
from typing import Any

import orjson
import regopy

from dbguard.policy.compile import ENTRYPOINT, CompiledBundle
from dbguard.policy.decision import Decision
from dbguard.policy.engine import PolicyEvaluationError, decision_from_result

_ERROR = re.compile(r"\(error \d+:([^|()\s]+)\|(\d+)\|(\d+)\s*\(errormsg \d+:([^)]*)\)")


def _interpreter(bundle: CompiledBundle) -> regopy.Interpreter:
    interp = regopy.Interpreter()
    interp.add_data(bundle.data)
    for name, text in bundle.modules.items():
        interp.add_module(name, text)
    return interp


def compile_errors(bundle: CompiledBundle) -> list[tuple[str, int, str]]:
    """(module, line, message) for every error rego-cpp finds when building the bundle."""
    try:
        _interpreter(bundle).build(None, [ENTRYPOINT])
    except regopy.RegoError as exc:
        text = str(exc)
        errors = []
        for module, offset, _length, message in _ERROR.findall(text):
            source = bundle.modules.get(module, "")
            errors.append((module, source[: int(offset)].count("\n") + 1, message.strip()))
        return errors or [("bundle", 0, text.strip())]
    return []


class EmbeddedEngine:
    """Builds the bundle once; evaluates one input at a time (rego-cpp interpreters are not shared)."""

    def __init__(self, bundle: CompiledBundle) -> None:
        self.revision = bundle.revision
        try:
            self._bundle = _interpreter(bundle).build(None, [ENTRYPOINT])
        except regopy.RegoError as exc:
            raise PolicyEvaluationError(f"policy bundle does not compile: {exc}") from exc
        self._interp = regopy.Interpreter()
        self._lock = threading.Lock()

    def evaluate(self, input_doc: dict[str, Any]) -> Decision:
        with self._lock:
            try:
                self._interp.set_input(input_doc)
                output = self._interp.query_bundle_entrypoint(self._bundle, ENTRYPOINT)
            except regopy.RegoError as exc:
                raise PolicyEvaluationError(f"policy evaluation failed: {exc}") from exc
            if not output.ok():
                raise PolicyEvaluationError(f"policy evaluation failed: {output}")
            values = orjson.loads(output.expressions().json())
        if not values:
            raise PolicyEvaluationError("policy produced no decision (undefined)")
        return decision_from_result(values[0], self.revision)
