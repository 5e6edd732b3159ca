package dbguard

# The one library module every compiled GuardrailPolicy bundle ships. Rules are data
# (data.dbguard.policies, written by dbguard.policy.compile); this module only matches them.
# Per policy the first matching rule decides; raw Rego modules of a policy (package
# dbguard_custom.<key>) may add `deny` and `require_approval` objects {rule, reason}, which win
# over the policy's rules. Across policies the most severe enforced outcome wins.

severity := {"allow": 1, "require-approval": 2, "deny": 3}

# -- matching helpers -----------------------------------------------------------------------------

any_of(xs, _) if count(xs) == 0

any_of(xs, v) if v in xs

intersects(xs, _) if count(xs) == 0

intersects(xs, vs) if {
	some v in vs
	v in xs
}

part_ok("*", _)

part_ok(_, "")

part_ok(p, v) if p == v

name_ok("*", _)

name_ok(p, v) if p == v

table_ok(ts, _) if count(ts) == 0

table_ok(ts, a) if {
	a.name != ""
	some t in ts
	part_ok(t.schema, a.schema)
	name_ok(t.name, a.name)
}

column_ok(cs, _) if count(cs) == 0

column_ok(cs, a) if {
	some c in cs
	name_ok(c.table, a.name)
	part_ok(c.schema, a.schema)
	some col in a.columns
	col_ok(c.column, col)
}

col_ok(_, "*")

col_ok(p, v) if p == v

nested_ok(null, _)

nested_ok(want, got) if want == got

action_ok(m, a) if {
	any_of(m.operations, a.operation)
	any_of(m.objectTypes, a.object_type)
	table_ok(m.tables, a)
	column_ok(m.columns, a)
	any_of(m.where, a.where)
	nested_ok(m.nested, a.nested)
}

actions_ok(m) if not m.actionLevel

actions_ok(m) if {
	m.actionLevel
	some a in input.statement.actions
	action_ok(m, a)
}

function_ok(fs) if count(fs) == 0

function_ok(fs) if {
	some f in input.statement.functions
	parts := split(f, ".")
	parts[count(parts) - 1] in fs
}

function_ok(fs) if {
	some f in input.statement.functions
	f in fs
}

identity_ok(m) if {
	any_of(m.users, input.identity.user)
	intersects(m.groups, input.identity.groups)
	not excluded(m.notGroups)
}

excluded(gs) if {
	some g in input.identity.groups
	g in gs
}

within(w, minute) if {
	w.start <= w.end
	minute >= w.start
	minute < w.end
}

within(w, minute) if {
	w.start > w.end
	minute >= w.start
}

within(w, minute) if {
	w.start > w.end
	minute < w.end
}

time_ok(ws) if count(ws) == 0

time_ok(ws) if {
	some w in ws
	t := input.time.zones[w.timezone]
	t.weekday in w.days
	within(w, t.minute_of_day)
}

rule_matches(m) if {
	intersects(m.flags, input.statement.flags)
	any_of(m.commands, input.statement.command)
	function_ok(m.functions)
	identity_ok(m)
	time_ok(m.timeWindows)
	actions_ok(m)
}

# -- per policy -------------------------------------------------------------------------------------
# Written with partial objects and lookup tables rather than functions with `else`: rego-cpp 1.5.2
# (regopy) mixed up results of such functions across policies; the differential test against OPA
# caught it, and this form gives identical answers in both engines.

enforce := {
	"deny": {"allow": "allow", "deny": "deny", "require-approval": "require-approval"},
	"dryrun": {"allow": "allow", "deny": "allow", "require-approval": "allow"},
	"warn": {"allow": "allow", "deny": "allow", "require-approval": "allow"},
}

custom_found[key] := found if {
	some p in data.dbguard.policies
	key := p.key
	found := {
		"deny": sort([{"rule": d.rule, "reason": d.reason} | some d in data.dbguard_custom[key].deny]),
		"require_approval": sort([{"rule": d.rule, "reason": d.reason} | some d in data.dbguard_custom[key].require_approval]),
	}
}

rule_hits[key] := hits if {
	some p in data.dbguard.policies
	key := p.key
	hits := sort([i |
		r := p.rules[i]
		rule_matches(r.match)
	])
}

policy_outcomes[key] := o if {
	some p in data.dbguard.policies
	key := p.key
	found := custom_found[key]
	denies := [{"rule": d.rule, "action": "deny", "reason": d.reason, "approval": null} | some d in found.deny]
	approvals := [{"rule": d.rule, "action": "require-approval", "reason": d.reason, "approval": null} |
		some d in found.require_approval
	]
	matched := [{"rule": r.name, "action": r.action, "reason": r.reason, "approval": r.approval} |
		some j in rule_hits[key]
		r := p.rules[j]
	]
	fallback := [{
		"rule": "", "action": p.defaultAction, "approval": null,
		"reason": sprintf("no rule of policy %s matched: default %s", [p.name, p.defaultAction]),
	}]
	first := array.concat(array.concat(denies, approvals), array.concat(matched, fallback))[0]
	o := object.union(first, {
		"policy": p.name,
		"enforcement": p.enforcement,
		"enforced": enforce[p.enforcement][first.action],
	})
}

# -- the decision -------------------------------------------------------------------------------------

outcomes := [policy_outcomes[p.key] | some p in data.dbguard.policies]

scores := [s |
	some o in outcomes
	s := (severity[o.enforced] * 10) + severity[o.action]
]

best := [o |
	o := outcomes[i]
	scores[i] == max(scores)
]

decision := best[0]
