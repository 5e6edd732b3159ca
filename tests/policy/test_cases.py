"""examples/cases.yaml through the embedded engine, and the same through a real OPA: identical decisions."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from dbguard.identity.principal import Principal
from dbguard.policy import check, compile, decider, embedded, spec
from dbguard.policy import opa_server as opa_server_engine

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = yaml.safe_load((ROOT / "examples" / "cases.yaml").read_text())
NOW = datetime.datetime(2026, 11, 24, 14, 0, tzinfo=datetime.UTC)
SESSION = {"database": "app", "user": "", "application_name": "t", "client_addr": "", "protocol": "simple",
           "in_transaction": False}


@pytest.fixture(scope="module")
def bundle() -> compile.CompiledBundle:
    return compile.compile_policies(spec.load_policies([ROOT / "examples" / "policy.yaml"]))


@pytest.fixture(scope="module")
def embedded_decider(bundle) -> decider.Decider:
    return decider.Decider(bundle, embedded.EmbeddedEngine(bundle))


def principal(case: dict) -> Principal:
    ident = case.get("identity", {})
    return Principal(user=ident.get("user", "anonymous"), groups=tuple(ident.get("groups", [])))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_example_policy_case(case, embedded_decider):
    results = check.decide_sql(embedded_decider, case["sql"], principal(case), SESSION, NOW)
    worst = check._worst(results)
    for key, value in case["expect"].items():
        assert worst[key] == value, (case["sql"], worst)


def test_check_cli_runs_the_case_table_and_fails_on_a_mismatch(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "dbguard", "check", "--policy", str(ROOT / "examples" / "policy.yaml"),
                         "--cases", str(ROOT / "examples" / "cases.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(CASES)} passed, 0 failed" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: wrong, sql: DROP TABLE t, identity: {user: a}, expect: {action: allow}}\n")
    r = subprocess.run([sys.executable, "-m", "dbguard", "check", "--policy", str(ROOT / "examples" / "policy.yaml"),
                        "--cases", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "FAIL wrong: action: expected 'allow', got 'deny'" in r.stdout


def test_check_cli_prints_the_decision_as_json_without_a_database():
    r = subprocess.run([sys.executable, "-m", "dbguard", "check", "--policy", str(ROOT / "examples" / "policy.yaml"),
                        "--identity", "alice", "--group", "developers", "--sql", "DELETE FROM orders"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["decision"]["action"] == "deny" and out["decision"]["rule"] == "no-unfiltered-writes"
    assert out["facts"]["actions"][0]["operation"] == "DELETE"


# -- differential: the embedded engine and a real OPA give identical decisions ----------------------------


def _inputs(bundle, cases=CASES, now=NOW):
    from dbguard.analyze import analyze
    from dbguard.policy.input import build_input

    for case in cases:
        try:
            statements = analyze(case["sql"])
        except Exception:  # noqa: BLE001 - parse errors never reach an engine
            continue
        for f in statements:
            yield case["name"], build_input(principal(case), SESSION, f, now, bundle.timezones)


def test_embedded_engine_equals_opa_eval_binary(bundle, opa, tmp_path):
    for name, text in bundle.modules.items():
        (tmp_path / name.replace("/", "_")).write_text(text)
    (tmp_path / "data.json").write_text(json.dumps(bundle.data))
    engine = embedded.EmbeddedEngine(bundle)
    compared = 0
    for name, doc in _inputs(bundle):
        (tmp_path / "input.json").write_text(json.dumps(doc))
        args = [str(opa), "eval", "--format", "json", "--input", str(tmp_path / "input.json"),
                "--data", str(tmp_path / "data.json")]
        for mod in bundle.modules:
            args += ["--data", str(tmp_path / mod.replace("/", "_"))]
        r = subprocess.run([*args, "data.dbguard.decision"], capture_output=True, text=True, check=True)
        opa_value = json.loads(r.stdout)["result"][0]["expressions"][0]["value"]
        mine = engine.evaluate(doc).to_dict()
        mine.pop("revision")
        assert mine == opa_value, name
        compared += 1
    assert compared >= len(CASES) - 1


def test_embedded_engine_equals_opa_server_through_the_opa_engine(bundle, opa_server):
    engine = embedded.EmbeddedEngine(bundle)
    remote = opa_server_engine.OpaServerEngine(bundle, opa_server.url)
    for name, doc in _inputs(bundle):
        assert engine.evaluate(doc) == remote.evaluate(doc), name


def test_raw_rego_and_time_windows_decide_the_same_in_both_engines(opa_server):
    """Raw modules and time zones are where engines drift apart (rego-cpp once found nothing for
    data.x[p.key] with p a function argument); compare them too, at several times of day."""
    bundle = compile.compile_policies(spec.load_policies([ROOT / "tests" / "policy" / "data" / "custom-rego.yaml"]))
    engine = embedded.EmbeddedEngine(bundle)
    remote = opa_server_engine.OpaServerEngine(bundle, opa_server.url)
    seen = set()
    for hour in (3, 14):
        now = datetime.datetime(2026, 11, 24, hour, 0, tzinfo=datetime.UTC)
        for name, doc in _inputs(bundle, CASES, now):
            mine = engine.evaluate(doc)
            assert mine == remote.evaluate(doc), (name, hour)
            seen.add(mine.rule)
    assert {"agents-no-customers", "big-orders", "warn-on-ddl", "no-writes-at-night"} <= seen
