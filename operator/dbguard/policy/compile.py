"""GuardrailPolicies -> a Rego bundle: rules as data, one library module, raw modules beside it.

The same compiler serves the proxy, ``dbguard check`` and the operator, so a policy means the
same thing everywhere. The bundle's revision is a hash of everything in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re
from typing import Any

import orjson

from dbguard.errors import ConfigError
from dbguard.policy.spec import Match, Policy

LIBRARY_PATH = "dbguard/policy.rego"
ENTRYPOINT = "dbguard/decision"
QUERY = "data.dbguard.decision"
_PACKAGE_LINE = re.compile(r"^\s*package\s+[\w.]+\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompiledBundle:
    modules: dict[str, str]  # file name -> Rego text
    data: dict[str, Any]
    revision: str
    uses_time: bool  # any rule has time windows: decisions depend on the clock
    timezones: tuple[str, ...]
    policies: tuple[Policy, ...] = ()

    def to_json(self) -> bytes:
        """The bundle as one JSON document (what the operator publishes in a ConfigMap)."""
        return orjson.dumps({"revision": self.revision, "modules": self.modules, "data": self.data},
                            option=orjson.OPT_SORT_KEYS)


def library() -> str:
    return importlib.resources.files("dbguard.policy").joinpath("dbguard.rego").read_text()


def _split_ref(ref: str, parts: int) -> list[str]:
    """`a.b.c` -> parts, right-aligned, '*' filling what is not given; quotes keep dots."""
    items = [p.strip('"') for p in re.findall(r'"[^"]+"|[^.]+', ref)]
    return ["*"] * (parts - len(items)) + items


def _match_data(m: Match) -> dict[str, Any]:
    tables = [dict(zip(("schema", "name"), _split_ref(t, 2), strict=True)) for t in m.tables]
    columns = [dict(zip(("schema", "table", "column"), _split_ref(c, 3), strict=True)) for c in m.columns]
    action_level = bool(m.operations or m.object_types or m.tables or m.columns or m.where or m.nested is not None)
    return {
        "operations": list(m.operations), "objectTypes": list(m.object_types), "tables": tables,
        "columns": columns, "where": list(m.where), "nested": m.nested, "functions": list(m.functions),
        "flags": list(m.flags), "commands": list(m.commands), "users": list(m.users), "groups": list(m.groups),
        "notGroups": list(m.not_groups), "actionLevel": action_level,
        "timeWindows": [{"days": list(w.days), "start": w.start, "end": w.end, "timezone": w.timezone}
                        for w in m.time_windows],
    }


def _key(name: str) -> str:
    return "p_" + re.sub(r"[^a-z0-9_]", "_", name)


def compile_policies(policies: list[Policy], *, check: bool = True) -> CompiledBundle:
    """Compile; with ``check``, raw Rego is compiled by the embedded engine and errors name lines."""
    if not policies:
        raise ConfigError("no GuardrailPolicy to compile")
    modules = {LIBRARY_PATH: library()}
    data_policies = []
    timezones: set[str] = set()
    for p in policies:
        rules = []
        for r in p.rules:
            timezones.update(w.timezone for w in r.match.time_windows)
            approval = None
            if r.approval is not None:
                a = r.approval
                approval = {"approverGroups": list(a.approver_groups), "approverUsers": list(a.approver_users),
                            "minApprovals": a.min_approvals, "ttlSeconds": a.ttl_seconds, "mode": a.mode,
                            "timeoutSeconds": a.timeout_seconds}
            rules.append({"name": r.name, "action": r.action.value, "reason": r.reason,
                          "approval": approval, "match": _match_data(r.match)})
        data_policies.append({"name": p.name, "key": _key(p.name), "enforcement": p.enforcement.value,
                              "defaultAction": p.default_action.value, "rules": rules})
        if p.rego:
            if not _PACKAGE_LINE.search(p.rego):
                raise ConfigError(f"{p.source}:{p.rego_line}: policy {p.name!r}: the rego module needs a "
                                  "'package' line (it is placed in package dbguard_custom.<policy>)")
            # Keep line numbers: replace the package line in place.
            modules[f"custom/{p.name}.rego"] = _PACKAGE_LINE.sub(f"package dbguard_custom.{_key(p.name)}", p.rego,
                                                                 count=1)
    data = {"dbguard": {"policies": data_policies}}
    # The revision covers everything a policy decides, masking included: a masking change is a new revision.
    masking = {p.name: [dataclasses.asdict(r) for r in p.masking] for p in policies}
    digest = hashlib.sha256(orjson.dumps({"m": modules, "d": data, "k": masking},
                                         option=orjson.OPT_SORT_KEYS)).hexdigest()
    bundle = CompiledBundle(modules=modules, data=data, revision=digest[:12], uses_time=bool(timezones),
                            timezones=tuple(sorted(timezones)), policies=tuple(policies))
    if check:
        from dbguard.policy import embedded  # the compile check is the embedded engine's job

        errors = embedded.compile_errors(bundle)
        if errors:
            by_module = {f"custom/{p.name}.rego": p for p in policies}
            lines = []
            for module, line, message in errors:
                p = by_module.get(module)
                if p is not None:
                    lines.append(f"{p.source}:{p.rego_line + line - 1}: policy {p.name!r}: rego line {line}: {message}")
                else:
                    lines.append(f"{module}:{line}: {message}")
            raise ConfigError("Rego does not compile:\n  " + "\n  ".join(lines))
    return bundle
