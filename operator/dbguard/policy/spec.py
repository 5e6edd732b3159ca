"""GuardrailPolicy documents: load YAML, validate strictly, keep line numbers for errors.

The same document is the ``spec`` of the ``guardrailpolicies.dbguard.io/v1alpha1`` custom
resource. Reference: docs/guardrailpolicy.md.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import yaml

from dbguard.analyze.facts import Flag, Where
from dbguard.errors import ConfigError
from dbguard.policy.decision import EnforcementAction, PolicyAction

API_VERSION = "dbguard.io/v1alpha1"
KIND = "GuardrailPolicy"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"]+")'
_TABLE = re.compile(rf"^(?:\*|{_IDENT})(?:\.(?:\*|{_IDENT}))?$")
_COLUMN = re.compile(rf"^(?:(?:\*|{_IDENT})\.){{0,2}}{_IDENT}$")
_AUDITED_COLUMN = re.compile(rf"^{_IDENT}\.{_IDENT}\.(?:\*|{_IDENT})$")  # schema.table.column, no wildcards but *
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])|24:00")  # fullmatch: ASCII digits only
_DURATION = re.compile(r"([0-9]+)(s|m|h|d)")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
OPERATIONS = frozenset({
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY", "CREATE", "ALTER", "DROP", "GRANT",
    "REVOKE", "COMMENT", "VACUUM", "ANALYZE", "REINDEX", "CLUSTER", "REFRESH", "LOCK", "CALL",
})
COMMANDS = frozenset({
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY", "EXPLAIN", "PREPARE", "EXECUTE",
    "DEALLOCATE", "TRANSACTION", "SET", "SHOW", "DISCARD", "DECLARE", "FETCH", "CLOSE", "LOCK", "NOTIFY", "LISTEN",
    "UNLISTEN", "DO", "CALL", "LOAD", "ALTER SYSTEM", "VACUUM", "CLUSTER", "REINDEX", "CHECKPOINT", "REFRESH",
    "COMMENT", "SECURITY LABEL", "GRANT", "CREATE", "ALTER", "DROP", "REASSIGN OWNED", "IMPORT",
})
MASK_STRATEGIES = frozenset({"redact", "partial", "email", "hash", "null"})


# -- YAML with line numbers ------------------------------------------------------------------------


class _Map(dict):
    line: int = 0
    key_lines: dict[str, int] = {}  # noqa: RUF012 - set per instance where needed


class _Seq(list):
    line: int = 0


def _to_python(node: yaml.Node, source: str) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = _Map()
        out.line = line
        for k, v in node.value:
            key = _to_python(k, source)
            if not isinstance(key, str):
                raise ConfigError(f"{source}:{k.start_mark.line + 1}: keys must be strings")
            if key in out:
                raise ConfigError(f"{source}:{k.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = _to_python(v, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = _Seq(_to_python(v, source) for v in node.value)
        seq.line = line
        return seq
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _line(value: Any, default: int) -> int:
    return getattr(value, "line", default) or default


# -- the model --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TimeWindow:
    days: tuple[str, ...]
    start: int  # minute of day
    end: int  # minute of day; end < start wraps past midnight
    timezone: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    operations: tuple[str, ...] = ()
    object_types: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    where: tuple[str, ...] = ()
    nested: bool | None = None
    functions: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    not_groups: tuple[str, ...] = ()
    time_windows: tuple[TimeWindow, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    approver_groups: tuple[str, ...] = ()
    approver_users: tuple[str, ...] = ()
    min_approvals: int = 1
    ttl_seconds: int = 3600
    mode: str = "reject-and-retry"  # hold | reject-and-retry
    timeout_seconds: int = 300  # how long a held statement waits


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    action: PolicyAction
    reason: str
    match: Match
    description: str = ""
    approval: Approval | None = None
    line: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MaskRule:
    columns: tuple[str, ...]
    strategy: str
    options: dict[str, Any]
    except_groups: tuple[str, ...] = ()  # these groups see clear text
    only_groups: tuple[str, ...] = ()  # the rule applies only to these groups (empty: to everyone)
    from_comments: bool = False  # columns whose comment says `dbguard:mask=STRATEGY [option=value ...]`


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    enforcement: EnforcementAction = EnforcementAction.DENY
    default_action: PolicyAction = PolicyAction.ALLOW
    rules: tuple[Rule, ...] = ()
    masking: tuple[MaskRule, ...] = ()
    audit_rows: tuple[str, ...] = ()  # spec.audit.rows: "schema.table.column" / "schema.table.*" (row evidence)
    rego: str = ""
    rego_line: int = 0  # line of the rego: key in the source file, to map Rego errors back
    source: str = ""


# -- validation -------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, line: int, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line}: {where}: {message}")


def _check_keys(ctx: _Ctx, m: Any, allowed: set[str], where: str, line: int, required: tuple[str, ...] = ()) -> None:
    if not isinstance(m, dict):
        raise ctx.fail(line, where, "expected a mapping")
    unknown = sorted(set(m) - allowed)
    if unknown:
        raise ctx.fail(_line(m, line), where, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for key in required:
        if key not in m:
            raise ctx.fail(_line(m, line), where, f"missing required field {key!r}")


def _str_list(ctx: _Ctx, value: Any, where: str, line: int, *, allowed: frozenset[str] | None = None,
              pattern: re.Pattern[str] | None = None, upper: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(_line(value, line), where, "expected a non-empty list of strings")
    out = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise ctx.fail(_line(value, line), where, f"expected strings, got {item!r}")
        v = item.upper() if upper else item
        if allowed is not None and v not in allowed:
            raise ctx.fail(_line(value, line), where, f"unknown value {item!r}; allowed: {sorted(allowed)}")
        if pattern is not None and not pattern.fullmatch(item):
            raise ctx.fail(_line(value, line), where, f"malformed reference {item!r}")
        out.append(v)
    return tuple(out)


def _minutes(ctx: _Ctx, value: Any, where: str, line: int) -> int:
    if not isinstance(value, str) or not _HHMM.fullmatch(value):
        raise ctx.fail(line, where, f"expected HH:MM, got {value!r}")
    h, m = value.split(":")
    return int(h) * 60 + int(m)


def _duration(ctx: _Ctx, value: Any, where: str, line: int) -> int:
    match = _DURATION.fullmatch(str(value))
    if not match:
        raise ctx.fail(line, where, f"expected a duration like 30s, 15m, 1h, 2d; got {value!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _match(ctx: _Ctx, m: Any, where: str, line: int) -> Match:
    _check_keys(ctx, m, {"operations", "objectTypes", "tables", "columns", "where", "nested", "functions", "flags",
                         "identities", "timeWindows", "commands"}, where, line)
    line = _line(m, line)
    kw: dict[str, Any] = {}
    if "operations" in m:
        kw["operations"] = _str_list(ctx, m["operations"], f"{where}.operations", line, allowed=OPERATIONS, upper=True)
    if "objectTypes" in m:
        kw["object_types"] = _str_list(ctx, m["objectTypes"], f"{where}.objectTypes", line, upper=True)
    if "tables" in m:
        kw["tables"] = _str_list(ctx, m["tables"], f"{where}.tables", line, pattern=_TABLE)
    if "columns" in m:
        kw["columns"] = _str_list(ctx, m["columns"], f"{where}.columns", line, pattern=_COLUMN)
    if "where" in m:
        kw["where"] = _str_list(ctx, m["where"], f"{where}.where", line,
                                allowed=frozenset(w.value for w in Where if w is not Where.NOT_APPLICABLE))
    if "nested" in m:
        if not isinstance(m["nested"], bool):
            raise ctx.fail(line, f"{where}.nested", "expected true or false")
        kw["nested"] = m["nested"]
    if "functions" in m:
        kw["functions"] = tuple(f.lower() for f in _str_list(ctx, m["functions"], f"{where}.functions", line))
    if "flags" in m:
        kw["flags"] = _str_list(ctx, m["flags"], f"{where}.flags", line, allowed=frozenset(f.value for f in Flag))
    if "commands" in m:
        kw["commands"] = _str_list(ctx, m["commands"], f"{where}.commands", line, allowed=COMMANDS, upper=True)
    if "identities" in m:
        ids = m["identities"]
        _check_keys(ctx, ids, {"users", "groups", "notGroups"}, f"{where}.identities", line)
        for key, attr in (("users", "users"), ("groups", "groups"), ("notGroups", "not_groups")):
            if key in ids:
                kw[attr] = _str_list(ctx, ids[key], f"{where}.identities.{key}", _line(ids, line))
    if "timeWindows" in m:
        windows = m["timeWindows"]
        if not isinstance(windows, list) or not windows:
            raise ctx.fail(line, f"{where}.timeWindows", "expected a non-empty list")
        out = []
        for i, w in enumerate(windows):
            wwhere = f"{where}.timeWindows[{i}]"
            _check_keys(ctx, w, {"days", "start", "end", "timezone"}, wwhere, line, required=("start", "end"))
            wl = _line(w, line)
            days = _str_list(ctx, w["days"], f"{wwhere}.days", wl, allowed=frozenset(DAYS)) if "days" in w else DAYS
            tz = w.get("timezone", "UTC")
            _check_timezone(ctx, tz, f"{wwhere}.timezone", wl)
            out.append(TimeWindow(days=days, start=_minutes(ctx, w["start"], f"{wwhere}.start", wl),
                                  end=_minutes(ctx, w["end"], f"{wwhere}.end", wl), timezone=tz))
        kw["time_windows"] = tuple(out)
    return Match(**kw)


def _check_timezone(ctx: _Ctx, tz: Any, where: str, line: int) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(tz))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ctx.fail(line, where, f"unknown time zone {tz!r}") from exc


def _approval(ctx: _Ctx, a: Any, where: str, line: int) -> Approval:
    _check_keys(ctx, a, {"approvers", "minApprovals", "ttl", "mode", "timeout"}, where, line, required=("approvers",))
    line = _line(a, line)
    approvers = a["approvers"]
    _check_keys(ctx, approvers, {"groups", "users"}, f"{where}.approvers", line)
    groups = _str_list(ctx, approvers["groups"], f"{where}.approvers.groups", line) if "groups" in approvers else ()
    users = _str_list(ctx, approvers["users"], f"{where}.approvers.users", line) if "users" in approvers else ()
    if not groups and not users:
        raise ctx.fail(line, f"{where}.approvers", "name at least one approver group or user")
    min_approvals = a.get("minApprovals", 1)
    if not isinstance(min_approvals, int) or isinstance(min_approvals, bool) or not 1 <= min_approvals <= 10:
        raise ctx.fail(line, f"{where}.minApprovals", "expected an integer from 1 to 10")
    mode = a.get("mode", "reject-and-retry")
    if mode not in ("hold", "reject-and-retry"):
        raise ctx.fail(line, f"{where}.mode", f"unknown mode {mode!r}; allowed: hold, reject-and-retry")
    return Approval(approver_groups=groups, approver_users=users, min_approvals=min_approvals,
                    ttl_seconds=_duration(ctx, a.get("ttl", "1h"), f"{where}.ttl", line), mode=mode,
                    timeout_seconds=_duration(ctx, a.get("timeout", "5m"), f"{where}.timeout", line))


def _enum(ctx: _Ctx, cls: Any, value: Any, where: str, line: int) -> Any:
    try:
        return cls(value)
    except ValueError as exc:
        raise ctx.fail(line, where, f"unknown value {value!r}; allowed: {[e.value for e in cls]}") from exc


def _rule(ctx: _Ctx, r: Any, i: int, line: int) -> Rule:
    where = f"spec.rules[{i}]"
    _check_keys(ctx, r, {"name", "description", "match", "action", "reason", "approval"}, where, line,
                required=("name", "action"))
    line = _line(r, line)
    name = r["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ctx.fail(line, f"{where}.name", f"{name!r} must be a lower-case DNS label (a-z, 0-9, -)")
    where = f"rule {name!r}"
    action = _enum(ctx, PolicyAction, r["action"], f"{where}: action", line)
    approval = None
    if action is PolicyAction.REQUIRE_APPROVAL:
        if "approval" not in r:
            raise ctx.fail(line, where, "action require-approval needs an 'approval' section (approvers, ttl, mode)")
        approval = _approval(ctx, r["approval"], f"{where}: approval", line)
    elif "approval" in r:
        raise ctx.fail(line, where, "'approval' only goes with action require-approval")
    reason = r.get("reason", r.get("description", ""))
    if not isinstance(reason, str):
        raise ctx.fail(line, f"{where}: reason", "expected a string")
    match = _match(ctx, r.get("match", _Map()), f"{where}: match", line)
    return Rule(name=name, action=action, reason=reason or f"rule {name}", match=match,
                description=str(r.get("description", "")), approval=approval, line=line)


def _mask(ctx: _Ctx, m: Any, i: int, line: int) -> MaskRule:
    where = f"spec.masking[{i}]"
    from_comments = m.get("fromComments", False) if isinstance(m, dict) else False
    _check_keys(ctx, m, {"columns", "strategy", "options", "except", "identities", "fromComments"}, where, line,
                required=() if from_comments is True else ("columns", "strategy"))
    line = _line(m, line)
    if not isinstance(from_comments, bool):
        raise ctx.fail(line, f"{where}.fromComments", "expected true or false")
    if from_comments and ("columns" in m or "strategy" in m):
        raise ctx.fail(line, where, "fromComments takes the columns and the strategy from column comments; "
                                    "drop columns and strategy")
    strategy = m.get("strategy", "redact")
    if strategy not in MASK_STRATEGIES:
        raise ctx.fail(line, f"{where}.strategy", f"unknown strategy {strategy!r}; allowed: {sorted(MASK_STRATEGIES)}")
    options = m.get("options", {})
    if not isinstance(options, dict):
        raise ctx.fail(line, f"{where}.options", "expected a mapping")
    exc = m.get("except", {})
    _check_keys(ctx, exc, {"groups"}, f"{where}.except", line)
    groups = _str_list(ctx, exc["groups"], f"{where}.except.groups", line) if "groups" in exc else ()
    who = m.get("identities", {})
    _check_keys(ctx, who, {"groups"}, f"{where}.identities", line)
    only = _str_list(ctx, who["groups"], f"{where}.identities.groups", line) if "groups" in who else ()
    for key, value in options.items():
        if key in ("keepFirst", "keepLast", "length") and (not isinstance(value, int) or value < 0):
            raise ctx.fail(line, f"{where}.options.{key}", "expected a non-negative integer")
    columns = () if from_comments else _str_list(ctx, m["columns"], f"{where}.columns", line, pattern=_COLUMN)
    return MaskRule(columns=columns, strategy=strategy, options=dict(options), except_groups=groups,
                    only_groups=only, from_comments=from_comments)


def parse_policy(doc: Any, source: str) -> Policy:
    """Validate one GuardrailPolicy document (a parsed YAML mapping with line numbers)."""
    ctx = _Ctx(source)
    line = _line(doc, 1)
    _check_keys(ctx, doc, {"apiVersion", "kind", "metadata", "spec"}, "document", line,
                required=("apiVersion", "kind", "metadata", "spec"))
    if doc["apiVersion"] != API_VERSION or doc["kind"] != KIND:
        raise ctx.fail(line, "document", f"expected apiVersion {API_VERSION} and kind {KIND}")
    meta = doc["metadata"]
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not _NAME.fullmatch(meta["name"]):
        raise ctx.fail(_line(meta, line), "metadata.name", "required, a lower-case DNS label")
    spec = doc["spec"]
    _check_keys(ctx, spec, {"enforcementAction", "defaultAction", "rules", "masking", "audit", "rego"}, "spec", line)
    sline = _line(spec, line)
    enforcement = _enum(ctx, EnforcementAction, spec.get("enforcementAction", "deny"), "spec.enforcementAction", sline)
    default = _enum(ctx, PolicyAction, spec.get("defaultAction", "allow"), "spec.defaultAction", sline)
    if default is PolicyAction.REQUIRE_APPROVAL:
        raise ctx.fail(sline, "spec.defaultAction", "must be allow or deny")
    rules_doc = spec.get("rules", [])
    if not isinstance(rules_doc, list):
        raise ctx.fail(sline, "spec.rules", "expected a list")
    rules = tuple(_rule(ctx, r, i, _line(rules_doc, sline)) for i, r in enumerate(rules_doc))
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ctx.fail(r.line, f"rule {r.name!r}", "duplicate rule name")
        seen.add(r.name)
    masking_doc = spec.get("masking", [])
    if not isinstance(masking_doc, list):
        raise ctx.fail(sline, "spec.masking", "expected a list")
    masking = tuple(_mask(ctx, m, i, _line(masking_doc, sline)) for i, m in enumerate(masking_doc))
    audit = spec.get("audit", {})
    _check_keys(ctx, audit, {"rows"}, "spec.audit", sline)
    audit_rows = _str_list(ctx, audit["rows"], "spec.audit.rows", _line(audit, sline)) if "rows" in audit else ()
    for ref in audit_rows:
        if not _AUDITED_COLUMN.fullmatch(ref):
            raise ctx.fail(_line(audit, sline), "spec.audit.rows",
                           f"{ref!r}: expected schema.table.column or schema.table.* (row evidence needs exact tables)")
    rego = spec.get("rego", "")
    if not isinstance(rego, str):
        raise ctx.fail(sline, "spec.rego", "expected a Rego module as a string")
    rego_line = 0
    if rego:
        rego_line = _find_key_line(doc, "rego")
    return Policy(name=meta["name"], enforcement=enforcement, default_action=default, rules=rules,
                  masking=masking, audit_rows=audit_rows, rego=rego, rego_line=rego_line, source=source)


def _find_key_line(doc: Any, key: str) -> int:
    return getattr(doc.get("spec"), "key_lines", {}).get(key, 0)


def load_text(text: str, source: str) -> list[Policy]:
    """All GuardrailPolicy documents in one YAML text."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    policies = []
    for node in nodes:
        if node is None:
            continue
        doc = _to_python(node, source)
        if isinstance(doc, dict) and isinstance(doc.get("spec"), dict) and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == "spec" and isinstance(v, yaml.MappingNode):
                    for sk, sv in v.value:
                        if sk.value == "rego":
                            # 1-based line of the module's first line: a block scalar starts after its indicator.
                            doc["spec"].key_lines = {"rego": sv.start_mark.line + (2 if sv.style in ("|", ">") else 1)}
        policies.append(parse_policy(doc, source))
    return policies


def load_policies(paths: list[str | pathlib.Path]) -> list[Policy]:
    """Load and validate every policy in the given files; names must be unique across them."""
    if not paths:
        raise ConfigError("no policy file given")
    policies: list[Policy] = []
    for path in paths:
        p = pathlib.Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read policy file: {exc.strerror}") from exc
        found = load_text(text, str(p))
        if not found:
            raise ConfigError(f"{p}: no GuardrailPolicy document in the file")
        policies.extend(found)
    names = [p.name for p in policies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"GuardrailPolicy name(s) given more than once: {dupes}")
    return policies
