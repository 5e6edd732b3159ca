"""GuardrailPolicy: validate and compile with the proxy's own compiler, publish the bundle.

Each policy that compiles is published in a ConfigMap ``dbguard-policy-NAME`` beside it: the
policy document the sidecars mount and hot-reload (``policy.yaml``), the compiled bundle for OPA
servers (``bundle.json``) and its revision. A policy that does not compile keeps its last good
ConfigMap (running proxies keep enforcing it) and says why in its status, with line numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import yaml
from kubernetes import client

from dbguard.controller.conditions import set_condition
from dbguard.controller.kube import apply_config_map
from dbguard.controller.settings import API_VERSION
from dbguard.errors import ConfigError
from dbguard.policy import compile as policy_compile
from dbguard.policy import spec as policy_spec

log = logging.getLogger(__name__)
KIND = "GuardrailPolicy"


def config_map_name(policy: str) -> str:
    return f"dbguard-policy-{policy}"


def document(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The policy as the YAML document ``dbguard proxy --policy`` and ``dbguard check`` read."""
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": dict(spec)}


@dataclasses.dataclass(frozen=True, slots=True)
class Compiled:
    ok: bool
    revision: str = ""
    policy_yaml: str = ""
    bundle_json: str = ""
    errors: tuple[str, ...] = ()
    reason: str = ""


def compile_resource(namespace: str, name: str, spec: dict[str, Any]) -> Compiled:
    """Validate and compile one GuardrailPolicy resource (pure: no API calls)."""
    source = f"GuardrailPolicy {namespace}/{name}"
    doc = document(name, spec)
    try:
        policy = policy_spec.parse_policy(doc, source)
        if policy.rego:
            policy = dataclasses.replace(policy, rego_line=1)  # errors then name the line in spec.rego
        bundle = policy_compile.compile_policies([policy])
    except ConfigError as exc:
        text = str(exc)
        reason = "RegoCompileError" if text.startswith("Rego does not compile") else "InvalidSpec"
        errors = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.endswith(":"))
        return Compiled(ok=False, errors=errors or (text,), reason=reason)
    text = yaml.safe_dump(doc, sort_keys=False)
    # The published document must mean what was compiled: load it back the way a proxy will.
    reloaded = policy_compile.compile_policies(policy_spec.load_text(text, source), check=False)
    if reloaded.revision != bundle.revision:  # would be a bug in the YAML round trip: never publish it
        return Compiled(ok=False, errors=(f"{source}: the published document would compile to revision "
                                          f"{reloaded.revision}, not {bundle.revision}",), reason="InternalError")
    return Compiled(ok=True, revision=bundle.revision, policy_yaml=text, bundle_json=bundle.to_json().decode())


def reconcile(body: dict[str, Any], patch: Any, api: client.ApiClient) -> Compiled:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    status = body.get("status") or {}
    result = compile_resource(namespace, name, body.get("spec") or {})
    if result.ok:
        owner = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": meta["uid"], "controller": True,
                 "blockOwnerDeletion": False}
        apply_config_map(api, namespace, config_map_name(name),
                         data={"policy.yaml": result.policy_yaml, "bundle.json": result.bundle_json,
                               "revision": result.revision},
                         labels={"app.kubernetes.io/managed-by": "dbguard", "dbguard.io/policy": name},
                         annotations={"dbguard.io/revision": result.revision}, owner=owner)
        patch.status["revision"] = result.revision
        patch.status["errors"] = []
        patch.status["conditions"] = set_condition(status.get("conditions"), "Ready", True, "Compiled",
                                                   f"revision {result.revision} published in ConfigMap "
                                                   f"{config_map_name(name)}", generation)
        log.info("GuardrailPolicy %s/%s: revision %s published", namespace, name, result.revision)
    else:
        patch.status["errors"] = list(result.errors)
        kept = f"; proxies keep revision {status['revision']}" if status.get("revision") else ""
        patch.status["conditions"] = set_condition(status.get("conditions"), "Ready", False, result.reason,
                                                   "\n".join(result.errors) + kept, generation)
        log.warning("GuardrailPolicy %s/%s does not compile: %s", namespace, name, "; ".join(result.errors))
    patch.status["observedGeneration"] = generation
    return result
