"""Which columns an identity sees masked, and how: the policies' masking rules, resolved per identity.

A column reference is ``column``, ``table.column`` or ``schema.table.column``; any part but the
column may be ``*``. Rules are read in policy order; for a column, the first rule whose columns
match and that applies to the identity (``identities.groups``, or everyone) decides: clear text
for its ``except.groups``, its strategy for everyone else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from dbguard.policy.spec import MaskRule, Policy


@dataclasses.dataclass(frozen=True, slots=True)
class ColumnMask:
    strategy: str
    options: tuple[tuple[str, Any], ...]
    rule: str  # "policy/masking[i]", for errors and the ledger

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


@dataclasses.dataclass(frozen=True, slots=True)
class _Pattern:
    schema: str  # "*" = any
    table: str
    column: str
    rule: MaskRule
    name: str

    def matches(self, schema: str, table: str, column: str, comment: CommentMask | None) -> bool:
        if self.rule.from_comments:
            return comment is not None
        return (self.column == column and self.table in ("*", table) and self.schema in ("*", schema))


# A column comment's mask: (strategy, options) parsed from `dbguard:mask=STRATEGY key=value ...`.
CommentMask = tuple[str, tuple[tuple[str, Any], ...]]


def parse_comment(text: str) -> CommentMask | None:
    """``Social security number. dbguard:mask=partial keepLast=4`` -> ("partial", (("keepLast", 4),))."""
    marker = text.find("dbguard:mask=")
    if marker < 0:
        return None
    words = text[marker + len("dbguard:mask="):].split()
    if not words:
        return None
    strategy = words[0].rstrip(".,;")
    options: list[tuple[str, Any]] = []
    for word in words[1:]:
        key, eq, value = word.rstrip(".,;").partition("=")
        if not eq:
            break
        options.append((key, int(value) if value.isdigit() else value))
    return strategy, tuple(sorted(options))


def _pattern(ref: str, rule: MaskRule, name: str) -> _Pattern:
    parts = ref.split(".")
    while len(parts) < 3:
        parts.insert(0, "*")
    return _Pattern(parts[0], parts[1], parts[2], rule, name)


class MaskSet:
    """The masks of one identity: a lookup from (schema, table, column) to a mask or clear text."""

    def __init__(self, patterns: Sequence[_Pattern], groups: frozenset[str]) -> None:
        self._patterns = [p for p in patterns if not p.rule.only_groups or groups & set(p.rule.only_groups)]
        self._groups = groups
        self.column_names = frozenset(p.column for p in self._patterns)
        self.uses_comments = any(p.rule.from_comments for p in self._patterns)

    def __bool__(self) -> bool:
        return any(not (self._groups & set(p.rule.except_groups)) for p in self._patterns)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - MaskSets live as long as their policy revision
    def lookup(self, schema: str, table: str, column: str, comment: CommentMask | None = None) -> ColumnMask | None:
        if column not in self.column_names and (comment is None or not self.uses_comments):
            return None
        for p in self._patterns:
            if p.matches(schema, table, column, comment):
                if self._groups & set(p.rule.except_groups):
                    return None
                if p.rule.from_comments and comment is not None:
                    return ColumnMask(comment[0], comment[1], f"{p.name} (comment on {table}.{column})")
                return ColumnMask(p.rule.strategy, tuple(sorted(p.rule.options.items())), p.name)
        return None


class MaskPolicy:
    """All masking rules of the loaded policies; hands out one MaskSet per set of groups."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self._patterns = [_pattern(ref, rule, f"{policy.name}/masking[{i}]")
                          for policy in policies for i, rule in enumerate(policy.masking)
                          for ref in (rule.columns or ("*.*.*",))]  # a fromComments rule: one entry
        self.uses_comments = any(p.rule.from_comments for p in self._patterns)
        self._cache: dict[frozenset[str], MaskSet] = {}
        self.column_names = frozenset(p.column for p in self._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def strictest(self, schema: str, table: str, column: str) -> ColumnMask | None:
        """The first rule that masks this column for anyone, whatever their groups: how copies kept
        for auditors (the ledger's row evidence) show the column."""
        for p in self._patterns:
            if not p.rule.from_comments and p.matches(schema, table, column, None):
                return ColumnMask(p.rule.strategy, tuple(sorted(p.rule.options.items())), p.name)
        return None

    def for_groups(self, groups: Sequence[str]) -> MaskSet:
        key = frozenset(groups)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = MaskSet(self._patterns, key)
        return found
