"""GuardrailPolicy validation (errors name file and line), raw Rego, enforcement, time, the decider's limits."""

from __future__ import annotations

import asyncio
import datetime
import textwrap

import pytest

from dbguard.analyze import analyze
from dbguard.errors import ConfigError
from dbguard.identity.principal import Principal
from dbguard.policy import compile, decider, embedded, spec
from dbguard.policy.decision import PolicyAction

ALICE = Principal(user="alice", groups=("developers",))
SESSION = {"database": "app", "protocol": "simple", "in_transaction": False}
NOON = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)


def policy(body: str, *, name: str = "p", enforcement: str = "deny") -> str:
    return textwrap.dedent(f"""\
        apiVersion: dbguard.io/v1alpha1
        kind: GuardrailPolicy
        metadata:
          name: {name}
        spec:
          enforcementAction: {enforcement}
        """) + textwrap.indent(textwrap.dedent(body), "  ")


def load(text: str) -> list[spec.Policy]:
    return spec.load_text(text, "policy.yaml")


def decide(text: str, sql: str, who: Principal = ALICE, now: datetime.datetime = NOON):
    bundle = compile.compile_policies(load(text))
    d = decider.Decider(bundle, embedded.EmbeddedEngine(bundle))
    return d.evaluate(who, SESSION, analyze(sql)[0], now)


@pytest.mark.parametrize("body, error", [
    ("rules:\n- name: r\n  action: deny\n  match: {operations: [DELET]}\n", "policy.yaml:10: rule 'r': match.operations: unknown value 'DELET'"),
    ("rules:\n- name: r\n  action: block\n", "policy.yaml:8: rule 'r': action: unknown value 'block'"),
    ("rules:\n- name: r\n  action: deny\n  match: {columns: ['customers..balance']}\n", "malformed reference 'customers..balance'"),
    ("rules:\n- name: r\n  action: deny\n  mach: {}\n", "policy.yaml:8: spec.rules[0]: unknown field(s) ['mach']"),
    ("rules:\n- name: r\n  action: deny\n- name: r\n  action: allow\n", "policy.yaml:10: rule 'r': duplicate rule name"),
    ("rules:\n- name: Bad_Name\n  action: deny\n", "must be a lower-case DNS label"),
    ("rules:\n- name: r\n  action: require-approval\n", "needs an 'approval' section"),
    ("rules:\n- name: r\n  action: deny\n  match: {where: [sometimes]}\n", "match.where: unknown value 'sometimes'"),
    ("rules:\n- name: r\n  action: deny\n  match: {flags: [evil]}\n", "match.flags: unknown value 'evil'"),
    ("rules:\n- name: r\n  action: deny\n  match: {timeWindows: [{start: '25:00', end: '06:00'}]}\n", "expected HH:MM"),
    ("rules:\n- name: r\n  action: deny\n  match: {timeWindows: [{start: '01:00', end: '06:00', timezone: Mars/Base}]}\n",
     "unknown time zone"),
    ("masking:\n- {columns: [customers.ssn], strategy: scramble}\n", "unknown strategy 'scramble'"),
    ("enforcementAction: maybe\n", "spec.enforcementAction: unknown value 'maybe'"),
])
def test_bad_policies_are_rejected_with_file_line_and_rule(body, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        load(policy(body).replace("  enforcementAction: deny\n  enforcementAction", "  enforcementAction"))


def test_not_yaml_and_wrong_kind_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="policy.yaml:2: not valid YAML"):
        load("a: [1,\nb: }")
    with pytest.raises(ConfigError, match="expected apiVersion dbguard.io/v1alpha1 and kind GuardrailPolicy"):
        load("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(ConfigError, match="cannot read policy file"):
        spec.load_policies([tmp_path / "missing.yaml"])


def test_raw_rego_compile_errors_give_the_line_in_the_policy_file():
    text = policy("""\
        rules: []
        rego: |
          package anything
          deny contains {"rule": "x", "reason": "y"} if {
            input.statement.command ==
          }
        """)
    with pytest.raises(ConfigError) as exc:
        compile.compile_policies(load(text))
    message = str(exc.value)
    assert "Rego does not compile" in message
    assert "policy 'p': rego line 3" in message  # the line inside the module
    assert "policy.yaml:11:" in message  # and where that is in the file


def test_raw_rego_deny_wins_over_rules():
    text = policy("""\
        rules:
        - {name: everything, action: allow}
        rego: |
          package anything
          deny contains {"rule": "no-agents-at-all", "reason": "agents are off today"} if {
            "ai-agents" in input.identity.groups
          }
        """)
    agent = Principal(user="copilot", groups=("ai-agents",))
    d = decide(text, "SELECT 1", who=agent)
    assert (d.action, d.rule, d.reason) == (PolicyAction.DENY, "no-agents-at-all", "agents are off today")
    assert decide(text, "SELECT 1").action is PolicyAction.ALLOW


@pytest.mark.parametrize("enforcement, enforced", [("deny", "deny"), ("dryrun", "allow"), ("warn", "allow")])
def test_enforcement_action_decides_what_is_enforced(enforcement, enforced):
    text = policy("rules:\n- {name: no-drop, action: deny, match: {operations: [DROP]}}\n", enforcement=enforcement)
    d = decide(text, "DROP TABLE t")
    assert d.action is PolicyAction.DENY and d.enforced.value == enforced and d.enforcement.value == enforcement


def test_most_severe_enforced_outcome_wins_across_policies():
    strict = policy("rules:\n- {name: no-drop, action: deny, match: {operations: [DROP]}}\n", name="strict")
    lenient = policy("rules:\n- {name: anything, action: allow}\n", name="lenient")
    bundle = compile.compile_policies(load(lenient + "---\n" + strict))
    d = decider.Decider(bundle, embedded.EmbeddedEngine(bundle)).evaluate(ALICE, SESSION, analyze("DROP TABLE t")[0], NOON)
    assert (d.policy, d.rule, d.enforced) == ("strict", "no-drop", PolicyAction.DENY)


def test_first_matching_rule_decides():
    text = policy("""\
        rules:
        - {name: dba-may, action: allow, match: {operations: [DROP], identities: {groups: [dba]}}}
        - {name: nobody-else, action: deny, match: {operations: [DROP]}}
        """)
    assert decide(text, "DROP TABLE t", who=Principal(user="bob", groups=("dba",))).rule == "dba-may"
    assert decide(text, "DROP TABLE t").rule == "nobody-else"


def test_time_windows_in_their_time_zone():
    text = policy("""\
        rules:
        - name: no-writes-at-night
          action: deny
          match:
            operations: [UPDATE]
            timeWindows: [{days: [Mon, Tue, Wed, Thu, Fri], start: "22:00", end: "06:00", timezone: Europe/Berlin}]
        """)
    tuesday_0130_berlin = datetime.datetime(2026, 11, 24, 0, 30, tzinfo=datetime.UTC)  # 01:30 in Berlin
    tuesday_noon = datetime.datetime(2026, 11, 24, 11, 0, tzinfo=datetime.UTC)
    saturday_night = datetime.datetime(2026, 11, 28, 23, 30, tzinfo=datetime.UTC)
    sql = "UPDATE t SET a = 1 WHERE id = 1"
    assert decide(text, sql, now=tuesday_0130_berlin).rule == "no-writes-at-night"
    assert decide(text, sql, now=tuesday_noon).rule == ""
    assert decide(text, sql, now=saturday_night).rule == ""


def test_a_slow_policy_is_refused_after_the_deadline():
    slow = policy("""\
        rules: []
        rego: |
          package slow
          deny contains {"rule": "slow", "reason": "never"} if {
            n := count([x | some a in numbers.range(1, 400); some b in numbers.range(1, 400); x := a * b])
            n < 0
          }
        """)
    bundle = compile.compile_policies(load(slow))
    d = decider.Decider(bundle, embedded.EmbeddedEngine(bundle), timeout_s=0.02)
    decision = asyncio.run(d.decide(ALICE, SESSION, analyze("SELECT 1")[0], NOON))
    assert (decision.enforced, decision.rule) == (PolicyAction.DENY, "dbguard:policy-timeout")
    assert "within 20 ms" in decision.reason


def test_an_engine_error_is_a_refusal_not_an_allow():
    text = policy("""\
        rules: []
        rego: |
          package broken
          deny contains {"rule": "x", "reason": "y"} if {
            1 / 0 == input.nothing
          }
        """)
    bundle = compile.compile_policies(load(text))

    class Failing(embedded.EmbeddedEngine):
        def evaluate(self, input_doc):
            raise embedded.PolicyEvaluationError("engine exploded")

    d = decider.Decider(bundle, Failing(bundle))
    decision = asyncio.run(d.decide(ALICE, SESSION, analyze("SELECT 1")[0], NOON))
    assert (decision.enforced, decision.rule) == (PolicyAction.DENY, "dbguard:policy-error")


def test_decisions_are_cached_and_shared_by_concurrent_identical_requests():
    bundle = compile.compile_policies(load(policy("rules: []\n")))
    d = decider.Decider(bundle, embedded.EmbeddedEngine(bundle))
    facts = analyze("SELECT 1")[0]

    async def burst():
        return await asyncio.gather(*(d.decide(ALICE, SESSION, facts, NOON) for _ in range(20)))

    results = asyncio.run(burst())
    assert len({id(r) for r in results}) == 1 and d.misses == 20 and len(d._cache) == 1
    assert d.decide_cached(ALICE, SESSION, facts, NOON) is results[0]
