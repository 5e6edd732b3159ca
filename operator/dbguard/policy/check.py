"""``dbguard check``: decide statements offline, or run a table of expected decisions.

Like ``opa test`` / ``gator verify``: no database, the same analyzer, compiler and engine as the
proxy, so a CI pipeline can prove a policy change before it ships.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

import orjson
import yaml

from dbguard import analyze
from dbguard.analyze.facts import AnalysisError, Flag
from dbguard.errors import ConfigError
from dbguard.identity.principal import Principal
from dbguard.policy import compile as policy_compile
from dbguard.policy import decider as policy_decider
from dbguard.policy import spec
from dbguard.policy.decision import Decision

EPILOG = """\
examples:
  dbguard check --policy examples/policy.yaml --identity alice --group developers \\
      --sql "DELETE FROM orders"
  dbguard check --policy examples/policy.yaml --cases examples/cases.yaml

A cases file is a list of {name, sql, identity: {user, groups}, expect: {action, rule}}; every case
must match or the command exits 1. Exit 2 means a file could not be read or is invalid.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--policy", action="append", required=True, metavar="FILE", help="GuardrailPolicy YAML (repeatable)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sql", help="the statement(s) to decide")
    what.add_argument("--cases", metavar="FILE", help="YAML table of cases with expected decisions")
    p.add_argument("--identity", default="anonymous", metavar="USER", help="user name to decide for (with --sql)")
    p.add_argument("--group", action="append", default=[], metavar="GROUP", help="group of the identity (repeatable)")
    p.add_argument("--database", default="app", help="database name in the policy input (default app)")
    p.add_argument("--at", metavar="ISO-TIME", help="decide as if it were this time (default now), e.g. 2026-11-24T02:30:00Z")
    p.add_argument("--engine", choices=("embedded", "opa"), default="embedded")
    p.add_argument("--opa-url", default="", metavar="URL", help="OPA server for --engine opa")


def _decider(args: argparse.Namespace) -> policy_decider.Decider:
    bundle = policy_compile.compile_policies(spec.load_policies(args.policy))
    if args.engine == "opa":
        from dbguard.policy import opa_server

        engine: Any = opa_server.OpaServerEngine(bundle, args.opa_url)
    else:
        from dbguard.policy import embedded

        engine = embedded.EmbeddedEngine(bundle)
    return policy_decider.Decider(bundle, engine)


def decide_sql(decider: policy_decider.Decider, sql: str, principal: Principal, session: dict[str, Any],
               now: datetime.datetime) -> list[dict[str, Any]]:
    """One result per statement: the same judgement the proxy makes, including its built-in refusals."""
    try:
        statements = analyze.analyze(sql)
    except AnalysisError as exc:
        rule = "dbguard:parse-error" if exc.sqlstate == "42601" else "dbguard:unsupported"
        d = policy_decider.refusal_decision(rule, str(exc), decider.revision)
        return [{"statement": sql, "decision": d.to_dict(), "facts": None}]
    out = []
    for f in statements:
        if Flag.UNSAFE_SETTING in f.flags:
            d: Decision = policy_decider.refusal_decision(
                "dbguard:unsafe-setting", "this setting change would make the server read SQL differently",
                decider.revision)
        else:
            d = decider.evaluate(principal, session, f, now)
        out.append({"statement": f.text, "decision": d.to_dict(), "facts": f.to_dict()})
    return out


def _now(args: argparse.Namespace) -> datetime.datetime:
    if not args.at:
        return datetime.datetime.now(datetime.UTC)
    try:
        at = datetime.datetime.fromisoformat(args.at.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--at: not an ISO time: {args.at!r}") from exc
    return at if at.tzinfo else at.replace(tzinfo=datetime.UTC)


def _session(database: str) -> dict[str, Any]:
    return {"database": database, "user": "", "application_name": "dbguard-check", "client_addr": "",
            "protocol": "simple", "in_transaction": False}


def _worst(results: list[dict[str, Any]]) -> dict[str, Any]:
    order = {"allow": 0, "require-approval": 1, "deny": 2}
    return max((r["decision"] for r in results), key=lambda d: (order[d["enforced"]], order[d["action"]]))


def run_cases(decider: policy_decider.Decider, path: str, now: datetime.datetime, database: str) -> int:
    try:
        cases = yaml.safe_load(open(path).read())  # noqa: SIM115
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if isinstance(cases, dict):
        cases = cases.get("cases")
    if not isinstance(cases, list):
        raise ConfigError(f"{path}: expected a list of cases")
    failed = 0
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or "sql" not in case or "expect" not in case:
            raise ConfigError(f"{path}: case {i}: needs 'sql' and 'expect'")
        ident = case.get("identity", {}) or {}
        principal = Principal(user=str(ident.get("user", "anonymous")), groups=tuple(ident.get("groups", [])))
        at = case.get("at")
        when = datetime.datetime.fromisoformat(str(at).replace("Z", "+00:00")) if at else now
        got = _worst(decide_sql(decider, case["sql"], principal, _session(database), when))
        expect = case["expect"]
        mismatches = [f"{k}: expected {v!r}, got {got.get(k)!r}" for k, v in expect.items()
                      if got.get(k) != v]
        name = case.get("name", f"case {i}")
        if mismatches:
            failed += 1
            print(f"FAIL {name}: {'; '.join(mismatches)}\n     sql: {case['sql']}")
        else:
            print(f"PASS {name}")
    print(f"\n{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    try:
        decider = _decider(args)
        now = _now(args)
        if args.cases:
            return run_cases(decider, args.cases, now, args.database)
        principal = Principal(user=args.identity, groups=tuple(args.group))
        results = decide_sql(decider, args.sql, principal, _session(args.database), now)
    except ConfigError as exc:
        print(f"dbguard check: {exc}", file=sys.stderr)
        return 2
    for r in results:
        sys.stdout.write(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
