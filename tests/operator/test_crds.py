"""The three CRDs in crds/ against a real kube-apiserver: what `kubectl apply` accepts and rejects,
printer columns, the status subresource, CEL immutability of ApprovalRequests; and, without a
cluster, that the GuardrailPolicy schema cannot drift from what dbguard.policy.spec accepts."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import re
from typing import Any

import pytest
import yaml

from dbguard.analyze.facts import Flag, Where
from dbguard.errors import ConfigError
from dbguard.policy import spec
from dbguard.policy.decision import EnforcementAction, PolicyAction
from tests.fix_kube import KubePlane

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
CRDS = ROOT / "crds"
KINDS = {"GuardrailPolicy": "guardrailpolicies", "DatabaseAccess": "databaseaccesses",
         "ApprovalRequest": "approvalrequests"}
API = "dbguard.io/v1alpha1"


def crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load((CRDS / f"{KINDS[kind]}.yaml").read_text())


def schema(kind: str) -> dict[str, Any]:
    (version,) = crd(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def at(node: dict[str, Any], path: str) -> dict[str, Any]:
    """The sub-schema at a dotted path through properties; `[]` steps into array items."""
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def enum(kind: str, path: str) -> set[str]:
    node = at(schema(kind), path)
    return set((node.get("items", node) if node.get("type") == "array" else node)["enum"])


def example_policies() -> list[dict[str, Any]]:
    docs = []
    for path in sorted([*ROOT.glob("examples/*.yaml"), *ROOT.glob("tests/policy/data/*.yaml")]):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == spec.KIND]
    return docs


def merge(base: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7386): None deletes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def doc(kind: str, spec_: dict[str, Any], name: str = "x") -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec_}


def table(out: str) -> list[dict[str, str]]:
    """`kubectl get` output as rows keyed by header, cut at the header's column positions."""
    header, *lines = out.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for line in lines]


DBA = yaml.safe_load((ROOT / "examples/k8s/databaseaccess.yaml").read_text())
AR = yaml.safe_load((ROOT / "examples/k8s/approvalrequest.yaml").read_text())


# -- no cluster: the schema is spec.py's ---------------------------------------------------------------


def test_guardrailpolicy_enums_equal_what_spec_py_accepts():
    assert enum("GuardrailPolicy", "spec.rules.[].match.operations") == spec.OPERATIONS
    assert enum("GuardrailPolicy", "spec.rules.[].match.commands") == spec.COMMANDS
    assert enum("GuardrailPolicy", "spec.masking.[].strategy") == spec.MASK_STRATEGIES
    assert enum("GuardrailPolicy", "spec.rules.[].match.flags") == {f.value for f in Flag}
    assert enum("GuardrailPolicy", "spec.rules.[].match.where") == {w.value for w in Where} - {Where.NOT_APPLICABLE}
    assert enum("GuardrailPolicy", "spec.rules.[].match.timeWindows.[].days") == set(spec.DAYS)
    assert enum("GuardrailPolicy", "spec.rules.[].action") == {a.value for a in PolicyAction}
    assert enum("GuardrailPolicy", "spec.enforcementAction") == {e.value for e in EnforcementAction}
    assert enum("GuardrailPolicy", "spec.defaultAction") == {PolicyAction.ALLOW.value, PolicyAction.DENY.value}
    assert enum("GuardrailPolicy", "spec.rules.[].approval.mode") == {"hold", "reject-and-retry"}
    assert enum("ApprovalRequest", "spec.mode") == {"hold", "reject-and-retry"}


def test_crd_defaults_mean_the_same_to_spec_py_as_leaving_them_out():
    s = schema("GuardrailPolicy")
    approval = at(s, "spec.rules.[].approval")["properties"]
    defaults = {k: v["default"] for k, v in approval.items() if "default" in v}
    assert set(defaults) == {"minApprovals", "ttl", "mode", "timeout"}
    bare = doc("GuardrailPolicy", {"rules": [{"name": "r", "action": "require-approval",
                                              "approval": {"approvers": {"groups": ["dba"]}}}]})
    filled = merge(bare, {"spec": {"enforcementAction": at(s, "spec.enforcementAction")["default"],
                                   "defaultAction": at(s, "spec.defaultAction")["default"]}})
    filled["spec"]["rules"][0]["approval"].update(defaults)
    assert spec.parse_policy(filled, "filled") == dataclasses.replace(spec.parse_policy(bare, "bare"), source="filled")


REFS = ["orders", "public.orders", "*.orders", "*", "public.*", '"Order Lines"', '"S"."T"', "a$b", "_x",
        "a.b.c", "a.b.c.d", "customers..balance", "1abc", "a b", "*.*.ssn", "*.t.ssn", "s.t.*", '""', "a.", ".a",
        "orders\n", "a-b"]


@pytest.mark.parametrize("ref", REFS)
def test_table_and_column_patterns_agree_with_spec_py(ref):
    table_pattern = at(schema("GuardrailPolicy"), "spec.rules.[].match.tables.[]")["pattern"]
    column_pattern = at(schema("GuardrailPolicy"), "spec.rules.[].match.columns.[]")["pattern"]
    assert column_pattern == at(schema("GuardrailPolicy"), "spec.masking.[].columns.[]")["pattern"]
    # The API server matches with Go's RE2, where `$` is the end of the text; Python's `$` also
    # matches before a final newline, so spec.py accepts "orders\n" and the CRD does not.
    py_table = bool(spec._TABLE.match(ref)) and not ref.endswith("\n")
    py_column = bool(spec._COLUMN.match(ref)) and not ref.endswith("\n")
    assert bool(re.fullmatch(table_pattern, ref)) == py_table
    assert bool(re.fullmatch(column_pattern, ref)) == py_column


@pytest.mark.parametrize("value", ["00:00", "06:30", "23:59", "24:00", "24:01", "25:00", "7:00", "12:60", "1200"])
def test_time_pattern_agrees_with_spec_py(value):
    pattern = at(schema("GuardrailPolicy"), "spec.rules.[].match.timeWindows.[].start")["pattern"]
    assert bool(re.search(pattern, value)) == bool(spec._HHMM.match(value))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_crd_is_closed_and_has_status_conditions_and_observed_generation(kind):
    (version,) = crd(kind)["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert "x-kubernetes-preserve-unknown-fields" not in json.dumps(schema(kind))
    conditions = at(schema(kind), "status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "observedGeneration" in conditions["items"]["properties"]
    assert "observedGeneration" in at(schema(kind), "status")["properties"]
    assert version["additionalPrinterColumns"][-1] == {"name": "Age", "type": "date",
                                                       "jsonPath": ".metadata.creationTimestamp"}


# -- the real API server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds(kube: KubePlane) -> KubePlane:
    kube.kubectl("apply", "-f", str(CRDS))
    kube.kubectl("wait", "--for", "condition=established", "--timeout=60s",
                 *(f"crd/{plural}.dbguard.io" for plural in KINDS.values()))
    return kube


def apply(kube: KubePlane, ns: str, *docs: dict[str, Any], args: tuple[str, ...] = (), check: bool = False):
    return kube.kubectl("apply", "-n", ns, *args, "-f", "-", input=yaml.safe_dump_all(docs), check=check)


def get(kube: KubePlane, ns: str, resource: str) -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "-n", ns, resource, "-o", "json").stdout)


@pytest.mark.parametrize("policy", example_policies(), ids=lambda d: d["metadata"]["name"])
def test_example_guardrail_policy_is_accepted_and_reads_back_the_same_to_spec_py(crds, kube_ns, policy):
    apply(crds, kube_ns, policy, check=True)
    stored = get(crds, kube_ns, f"guardrailpolicy/{policy['metadata']['name']}")
    # What the operator reads (server defaults filled in) is the policy the file says.
    back = spec.parse_policy(doc(spec.KIND, stored["spec"], stored["metadata"]["name"]), "stored")
    want = spec.parse_policy(policy, "stored")
    assert dataclasses.replace(back, rules=tuple(dataclasses.replace(r, line=0) for r in back.rules)) == \
        dataclasses.replace(want, rules=tuple(dataclasses.replace(r, line=0) for r in want.rules))


def test_k8s_examples_are_accepted_with_documented_defaults(crds, kube_ns):
    crds.kubectl("apply", "-n", kube_ns, "-f", str(ROOT / "examples" / "k8s"))
    dba = get(crds, kube_ns, "databaseaccess/shop-api")["spec"]
    assert dba["database"]["credentialsSecret"] == {"name": "shop-db-credentials", "userKey": "username",
                                                    "passwordKey": "password"}
    assert dba["database"]["caSecret"] == {"name": "shop-db-ca", "key": "ca.crt"}
    assert dba["proxy"]["ledger"]["secret"] == {"name": "dbguard-ledger", "key": "url"}
    assert dba["proxy"]["ledger"]["signingKeySecret"] == {"name": "dbguard-ledger-signing-key", "key": "ledger.key"}
    assert dba["proxy"]["maskingKeySecret"] == {"name": "dbguard-masking-key", "key": "key"}
    minimal = doc("DatabaseAccess", {"database": {"host": "db", "name": "shop", "credentialsSecret": {"name": "c"}},
                                     "policies": ["p"], "proxy": {}}, name="minimal")
    apply(crds, kube_ns, minimal, check=True)
    got = get(crds, kube_ns, "databaseaccess/minimal")["spec"]
    assert (got["database"]["port"], got["database"]["sslMode"], got["proxy"]["port"]) == (5432, "require", 6432)
    ar = get(crds, kube_ns, f"approvalrequest/{AR['metadata']['name']}")["spec"]
    assert ar["minApprovals"] == 1 and ar["parameters"] == ["100.00", "1"]


def bad_policy(spec_: dict[str, Any]) -> dict[str, Any]:
    return doc("GuardrailPolicy", spec_, name="bad")


def deny(match: dict[str, Any]) -> dict[str, Any]:
    return {"rules": [{"name": "r", "action": "deny", "match": match}]}


def approval(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"name": "r", "action": "require-approval",
                       "approval": {"approvers": {"groups": ["dba"]}, **fields}}]}


# (case id, document, what kubectl's error must name)
BAD = [
    ("typo-actoin", bad_policy({"rules": [{"name": "r", "actoin": "deny"}]}), 'unknown field "spec.rules[0].actoin"'),
    ("action-deny-all", bad_policy({"rules": [{"name": "r", "action": "deny-all"}]}),
     'spec.rules[0].action: Unsupported value: "deny-all"'),
    ("strategy-scramble", bad_policy({"masking": [{"columns": ["customers.ssn"], "strategy": "scramble"}]}),
     'spec.masking[0].strategy: Unsupported value: "scramble"'),
    ("audit-rows-two-parts", bad_policy({"audit": {"rows": ["customers.balance"]}}), "spec.audit.rows[0]"),
    ("audit-rows-empty", bad_policy({"audit": {"rows": []}}), "spec.audit.rows"),
    ("audit-typo", bad_policy({"audit": {"row": ["public.customers.balance"]}}), 'unknown field "spec.audit.row"'),
    ("column-a.b.c.d", bad_policy({"masking": [{"columns": ["a.b.c.d"], "strategy": "redact"}]}),
     'spec.masking[0].columns[0]: Invalid value: "a.b.c.d"'),
    ("match-column-double-dot", bad_policy(deny({"columns": ["customers..balance"]})),
     "spec.rules[0].match.columns[0]"),
    ("match-table-three-parts", bad_policy(deny({"tables": ["db.public.orders"]})), "spec.rules[0].match.tables[0]"),
    ("operation-DELET", bad_policy(deny({"operations": ["DELET"]})),
     'spec.rules[0].match.operations[0]: Unsupported value: "DELET"'),
    ("command-unknown", bad_policy(deny({"commands": ["ALTER_SYSTEM"]})), "spec.rules[0].match.commands[0]"),
    ("flag-unknown", bad_policy(deny({"flags": ["evil"]})), "spec.rules[0].match.flags[0]"),
    ("where-sometimes", bad_policy(deny({"where": ["sometimes"]})), "spec.rules[0].match.where[0]"),
    ("time-25:00", bad_policy(deny({"timeWindows": [{"start": "25:00", "end": "06:00"}]})),
     'spec.rules[0].match.timeWindows[0].start: Invalid value: "25:00"'),
    ("day-Monday", bad_policy(deny({"timeWindows": [{"days": ["Monday"], "start": "01:00", "end": "02:00"}]})),
     "spec.rules[0].match.timeWindows[0].days[0]"),
    ("empty-identity-list", bad_policy(deny({"identities": {"groups": []}})), "spec.rules[0].match.identities.groups"),
    ("minApprovals-0", bad_policy(approval(minApprovals=0)), "spec.rules[0].approval.minApprovals"),
    ("minApprovals-11", bad_policy(approval(minApprovals=11)), "spec.rules[0].approval.minApprovals"),
    ("ttl-1-hour", bad_policy(approval(ttl="1 hour")), "spec.rules[0].approval.ttl"),
    ("mode-wait", bad_policy(approval(mode="wait")), "spec.rules[0].approval.mode"),
    ("no-approvers", bad_policy({"rules": [{"name": "r", "action": "require-approval", "approval": {"approvers": {}}}]}),
     "spec.rules[0].approval.approvers: Invalid value: name at least one approver group or user"),
    ("approval-missing", bad_policy({"rules": [{"name": "r", "action": "require-approval"}]}),
     "spec.rules[0].approval: Required value"),
    ("approval-on-deny", bad_policy({"rules": [{"name": "r", "action": "deny",
                                                "approval": {"approvers": {"groups": ["dba"]}}}]}),
     "spec.rules[0].approval: Forbidden"),
    ("duplicate-rule-names", bad_policy({"rules": [{"name": "r", "action": "deny"}, {"name": "r", "action": "allow"}]}),
     "spec.rules: Invalid value: rule names must be unique"),
    ("rule-name-Bad_Name", bad_policy({"rules": [{"name": "Bad_Name", "action": "deny"}]}), "spec.rules[0].name"),
    ("default-require-approval", bad_policy({"defaultAction": "require-approval"}), "spec.defaultAction"),
    ("enforcement-maybe", bad_policy({"enforcementAction": "maybe"}), "spec.enforcementAction"),
    ("unknown-spec-field", bad_policy({"enforcment": "warn"}), 'unknown field "spec.enforcment"'),
    ("fromComments-with-columns", bad_policy({"masking": [{"fromComments": True, "columns": ["ssn"]}]}),
     "spec.masking[0].fromComments: Forbidden"),
    ("masking-without-strategy", bad_policy({"masking": [{"columns": ["ssn"]}]}),
     "spec.masking[0].strategy: Required value"),
    ("option-negative", bad_policy({"masking": [{"columns": ["ssn"], "strategy": "partial",
                                                 "options": {"keepLast": -1}}]}), "spec.masking[0].options.keepLast"),
    ("policy-name-with-dot", doc("GuardrailPolicy", {}, name="shop.guardrails"), "metadata.name"),
    ("lower-case-operation", bad_policy(deny({"operations": ["delete"]})), "spec.rules[0].match.operations[0]"),
    # ApprovalRequest
    ("ar-fingerprint-short", merge(AR, {"spec": {"fingerprint": "abc123"}}), "spec.fingerprint"),
    ("ar-fingerprint-upper", merge(AR, {"spec": {"fingerprint": "A" * 64}}), "spec.fingerprint"),
    ("ar-no-statement", merge(AR, {"spec": {"statement": None}}), "spec.statement: Required value"),
    ("ar-decision-maybe", merge(AR, {"spec": {"decision": "Maybe"}}), "spec.decision"),
    ("ar-expires-tomorrow", merge(AR, {"spec": {"expiresAt": "tomorrow"}}), "spec.expiresAt"),
    ("ar-minApprovals-11", merge(AR, {"spec": {"minApprovals": 11}}), "spec.minApprovals"),
    ("ar-unknown-field", merge(AR, {"spec": {"approver": "carol"}}), 'unknown field "spec.approver"'),
    ("ar-statement-too-long", merge(AR, {"spec": {"statement": "x" * 65537}}), "spec.statement"),
    # DatabaseAccess
    ("dba-port-70000", merge(DBA, {"spec": {"database": {"port": 70000}}}), "spec.database.port"),
    ("dba-sslmode-allow", merge(DBA, {"spec": {"database": {"sslMode": "allow"}}}), "spec.database.sslMode"),
    ("dba-no-credentials", merge(DBA, {"spec": {"database": {"credentialsSecret": None}}}),
     "spec.database.credentialsSecret: Required value"),
    ("dba-no-policies", merge(DBA, {"spec": {"policies": []}}), "spec.policies"),
    ("dba-cpu-lots", merge(DBA, {"spec": {"proxy": {"resources": {"limits": {"cpu": "lots"}}}}}),
     "spec.proxy.resources.limits.cpu"),
    ("dba-timeout-words", merge(DBA, {"spec": {"proxy": {"policyTimeout": "2 seconds"}}}), "spec.proxy.policyTimeout"),
    ("dba-loglevel-lower", merge(DBA, {"spec": {"proxy": {"logLevel": "debug"}}}), "spec.proxy.logLevel"),
    ("dba-typo-workload", merge(DBA, {"spec": {"workload": {"serviceAccounts": ["x"]}}}),
     'unknown field "spec.workload"'),
]


@pytest.mark.parametrize("document, named", [pytest.param(d, n, id=i) for i, d, n in BAD])
def test_bad_spec_is_rejected_by_kubectl_apply_naming_the_field(crds, kube_ns, document, named):
    proc = apply(crds, kube_ns, document)
    assert proc.returncode != 0, proc.stdout
    assert named in proc.stderr


SPEC_PY_ACCEPTS = {"lower-case-operation"}  # spec.py upper-cases operations/commands; the CRD wants upper case


@pytest.mark.parametrize("document", [pytest.param(d, id=i) for i, d, _ in BAD if d["kind"] == spec.KIND])
def test_spec_py_agrees_with_the_crd_on_each_bad_policy(request, document):
    if request.node.callspec.id in SPEC_PY_ACCEPTS:
        spec.parse_policy(document, "bad")  # the known, documented difference (docs/crds.md)
        return
    with pytest.raises(ConfigError):
        spec.parse_policy(document, "bad")


GOOD = [
    ("empty-spec", {}),
    ("rego-only", {"rego": "package x\ndeny contains {\"rule\": \"r\", \"reason\": \"x\"} if { false }\n"}),
    ("quoted-and-wildcards", deny({"tables": ['"Order Lines"', "*.audit_log", "*"],
                                   "columns": ['"S"."T".c', "*.*.ssn", "ssn"]})),
    ("midnight-24:00", deny({"timeWindows": [{"days": ["Sat", "Sun"], "start": "00:00", "end": "24:00",
                                              "timezone": "America/Argentina/Buenos_Aires"}]})),
    ("all-match-fields", deny({"operations": ["DROP"], "objectTypes": ["FOREIGN TABLE"], "where": ["present"],
                               "nested": False, "functions": ["pg_read_file"], "flags": ["lock"],
                               "commands": ["ALTER SYSTEM", "SECURITY LABEL"],
                               "identities": {"users": ["alice"], "groups": ["dba"], "notGroups": ["oncall"]}})),
    ("approval-full", approval(minApprovals=10, ttl="2d", mode="hold", timeout="30s")),
    ("fromComments", {"masking": [{"fromComments": True, "except": {"groups": ["fraud"]}}]}),
    ("audit-rows", {"audit": {"rows": ["public.customers.balance", '"Shop"."Order Lines".*']}}),
    ("hash-options", {"masking": [{"columns": ["*.email"], "strategy": "hash", "options": {"length": 8, "prefix": "x:"},
                                   "identities": {"groups": ["ai-agents"]}, "fromComments": False}]}),
]


@pytest.mark.parametrize("spec_", [pytest.param(s, id=i) for i, s in GOOD])
def test_edge_case_policy_is_accepted_by_both_the_crd_and_spec_py(crds, kube_ns, spec_):
    spec.parse_policy(doc("GuardrailPolicy", spec_), "good")
    apply(crds, kube_ns, doc("GuardrailPolicy", spec_), check=True)


@pytest.mark.parametrize("validate, warning", [("warn", True), ("false", False)])
def test_unknown_field_is_only_pruned_when_kubectl_validation_is_relaxed(crds, kube_ns, validate, warning):
    # kubectl's default --validate=strict makes the server reject unknown fields (the table above);
    # with --validate=warn or false the structural schema prunes them and the typo is lost.
    typo = doc("GuardrailPolicy", {"enforcementAction": "warn", "enforcment": "dryrun"}, name="typo")
    proc = apply(crds, kube_ns, typo, args=(f"--validate={validate}",), check=True)
    assert ('unknown field "spec.enforcment"' in proc.stderr) is warning
    assert get(crds, kube_ns, "gp/typo")["spec"] == {"enforcementAction": "warn", "defaultAction": "allow"}


def test_guardrailpolicy_printer_columns_show_enforcement_revision_and_ready(crds, kube_ns):
    for policy in example_policies():
        if policy["metadata"]["name"] in ("shop-guardrails", "night-watch"):
            apply(crds, kube_ns, policy, check=True)
    status = {"status": {"observedGeneration": 1, "revision": "r-4f2a9c", "errors": [],
                         "decisions": {"allow": 10, "deny": 2, "requireApproval": 1, "dryrun": 0, "warn": 0},
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Compiled", "message": "ok",
                                         "lastTransitionTime": "2026-11-25T10:00:00Z", "observedGeneration": 1}]}}
    crds.kubectl("patch", "-n", kube_ns, "gp/shop-guardrails", "--subresource=status", "--type=merge",
                 "-p", json.dumps(status))
    for short in ("gp", "grp"):
        out = crds.kubectl("get", "-n", kube_ns, short).stdout
        assert out.splitlines()[0].split() == ["NAME", "ENFORCEMENT", "REVISION", "READY", "AGE"]
        rows = {r["NAME"]: r for r in table(out)}
        assert rows["shop-guardrails"]["ENFORCEMENT"] == "deny"
        assert (rows["shop-guardrails"]["REVISION"], rows["shop-guardrails"]["READY"]) == ("r-4f2a9c", "True")
        assert (rows["night-watch"]["ENFORCEMENT"], rows["night-watch"]["READY"]) == ("warn", "")
    wide = table(crds.kubectl("get", "-n", kube_ns, "gp", "-o", "wide").stdout)
    assert {r["NAME"]: r["REASON"] for r in wide}["shop-guardrails"] == "Compiled"


def test_approvalrequest_and_databaseaccess_printer_columns(crds, kube_ns):
    crds.kubectl("apply", "-n", kube_ns, "-f", str(ROOT / "examples" / "k8s"))
    name = AR["metadata"]["name"]
    crds.kubectl("patch", "-n", kube_ns, f"ar/{name}", "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": {"phase": "Pending", "observedGeneration": 1}}))
    out = crds.kubectl("get", "-n", kube_ns, "ar").stdout
    assert out.splitlines()[0].split() == ["NAME", "REQUESTER", "DATABASE", "OPERATION", "PHASE", "EXPIRES", "AGE"]
    (row,) = table(out)
    assert row | {"AGE": ""} == {"NAME": name, "REQUESTER": "alice", "DATABASE": "shop", "OPERATION": "UPDATE",
                                 "PHASE": "Pending", "EXPIRES": "2030-01-01T13:00:00Z", "AGE": ""}
    (wide,) = table(crds.kubectl("get", "-n", kube_ns, "approval", "-o", "wide").stdout)
    assert wide["RULE"] == "balance-change-needs-approval"

    ready = {"type": "Ready", "status": "True", "reason": "SidecarsInjected", "message": "2 pods",
             "lastTransitionTime": "2026-11-25T10:00:00Z", "observedGeneration": 1}
    crds.kubectl("patch", "-n", kube_ns, "dba/shop-api", "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"observedGeneration": 1, "ready": True, "injectedPods": 2, "policyRevision": "r-77",
                    "conditions": [ready]}}))
    out = crds.kubectl("get", "-n", kube_ns, "dbaccess").stdout
    assert out.splitlines()[0].split() == ["NAME", "DATABASE", "HOST", "READY", "INJECTED", "REVISION", "AGE"]
    (row,) = table(out)
    assert row | {"AGE": ""} == {"NAME": "shop-api", "DATABASE": "shop", "HOST": "shop-db.databases.svc.cluster.local",
                                 "READY": "True", "INJECTED": "2", "REVISION": "r-77", "AGE": ""}


def patch(kube: KubePlane, ns: str, resource: str, body: dict[str, Any], *extra: str):
    return kube.kubectl("patch", "-n", ns, resource, "--type=merge", "-p", json.dumps(body), *extra, check=False)


def test_approvalrequest_decision_is_final_once_set(crds, kube_ns):
    apply(crds, kube_ns, AR, check=True)
    ar = f"ar/{AR['metadata']['name']}"
    stamp = {"user": "carol", "groups": ["dba"], "decision": "Approved", "reason": "CHG-42",
             "at": "2026-11-25T10:00:00Z"}
    first = patch(crds, kube_ns, ar, {"spec": {"decision": "Approved", "reason": "CHG-42", "approvals": [stamp]}})
    assert first.returncode == 0, first.stderr
    for body, message in [
        ({"spec": {"decision": "Denied"}}, "spec.decision: Forbidden: a decision is final once set"),
        ({"spec": {"decision": None}}, "spec.decision: Forbidden: a decision is final once set"),
        ({"spec": {"reason": "changed my mind"}}, "spec.reason: Forbidden"),
        ({"spec": {"approvals": []}}, "spec.approvals: Forbidden: approvals can be added, never changed or removed"),
        ({"spec": {"approvals": [stamp | {"user": "mallory"}]}}, "spec.approvals: Forbidden"),
    ]:
        proc = patch(crds, kube_ns, ar, body)
        assert proc.returncode != 0 and message in proc.stderr, (body, proc.stderr)
    added = patch(crds, kube_ns, ar, {"spec": {"approvals": [stamp, stamp | {"user": "alice"}]}})
    assert added.returncode == 0, added.stderr
    assert get(crds, kube_ns, ar)["spec"]["decision"] == "Approved"


IMMUTABLE = [
    ({"statement": "UPDATE customers SET balance = 0"}, "statement is immutable"),
    ({"fingerprint": "0" * 64}, "fingerprint is immutable"),
    ({"parameters": ["1", "2"]}, "parameters are immutable"),
    ({"parameters": None}, "parameters are immutable"),
    ({"requester": {"user": "mallory"}}, "requester is immutable"),
    ({"requester": {"groups": ["dba"]}}, "requester is immutable"),
    ({"rule": {"name": "other-rule"}}, "rule is immutable"),
    ({"database": "other"}, "database is immutable"),
    ({"access": None}, "access is immutable"),
    ({"operation": "SELECT"}, "operation is immutable"),
    ({"approvers": {"groups": ["developers"]}}, "approvers are immutable"),
    ({"minApprovals": 2}, "minApprovals is immutable"),
    ({"mode": "hold"}, "mode is immutable"),
    ({"expiresAt": "2031-01-01T00:00:00Z"}, "expiresAt is immutable"),
]


@pytest.mark.parametrize("body, message", [
    pytest.param(b, m, id=f"{k}-{'removed' if v is None else 'changed'}") for b, m in IMMUTABLE for k, v in b.items()])
def test_approvalrequest_content_is_immutable(crds, kube_ns, body, message):
    apply(crds, kube_ns, AR, check=True)
    proc = patch(crds, kube_ns, f"ar/{AR['metadata']['name']}", {"spec": body})
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("kind, document", [pytest.param(k, d, id=k) for k, d in [
    ("GuardrailPolicy", example_policies()[0]), ("DatabaseAccess", DBA), ("ApprovalRequest", AR)]])
def test_status_is_a_subresource(crds, kube_ns, kind, document):
    apply(crds, kube_ns, document, check=True)
    resource = f"{KINDS[kind]}.dbguard.io/{document['metadata']['name']}"
    status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "False", "reason": "Testing",
                                                       "message": "", "lastTransitionTime": "2026-11-25T10:00:00Z"}]}
    # Through the main resource, status is ignored ...
    assert patch(crds, kube_ns, resource, {"status": status}).returncode == 0
    assert "status" not in get(crds, kube_ns, resource)
    # ... through the subresource it is written, and does not bump the generation ...
    done = patch(crds, kube_ns, resource, {"status": status}, "--subresource=status")
    assert done.returncode == 0, done.stderr
    obj = get(crds, kube_ns, resource)
    assert obj["status"] == status and obj["metadata"]["generation"] == 1
    # ... which is also where the status schema is enforced ...
    bad = patch(crds, kube_ns, resource, {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}},
                "--subresource=status")
    assert bad.returncode != 0 and "status.conditions[0].status" in bad.stderr
    # ... and a spec change keeps it.
    changed = patch(crds, kube_ns, resource, {"metadata": {"labels": {"x": "y"}},
                                              "spec": {"estimatedRows": 3} if kind == "ApprovalRequest" else
                                              {"policies": ["other"]} if kind == "DatabaseAccess" else
                                              {"enforcementAction": "dryrun"}})
    assert changed.returncode == 0, changed.stderr
    obj = get(crds, kube_ns, resource)
    assert obj["status"] == status and obj["metadata"]["generation"] == 2
