"""What the governed database looks like, as far as masking needs: read from its catalog.

One snapshot per proxy: every relation (to tell known tables from new ones), the attributes whose
names any masking rule mentions (table OID + attribute number: what RowDescription reports), which
views read which columns (through their rewrite rules), and the names of functions defined
outside the system catalog. It is refreshed after DDL passes through the proxy, when a statement
names a relation the snapshot does not know, and every ``max_age`` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable

import orjson
import psycopg
from pglast import parser as pgparser

from dbguard.config import UpstreamSettings
from dbguard.masking.rules import ColumnMask, CommentMask, MaskSet, parse_comment
from dbguard.policy.spec import MASK_STRATEGIES

log = logging.getLogger("dbguard.masking")


def references_whole_rows(sql: str) -> bool:
    """Whether a view definition may pass a whole row on (``c.*``, ``row_to_json(c)``, ``t`` as a
    value); True when it cannot be parsed. Conservative: a column named like a FROM entry counts."""
    try:
        tree = orjson.loads(pgparser.parse_sql_json(sql))
    except pgparser.ParseError:
        return True
    names: set[str] = set()
    refs: list[list[dict]] = []
    stack: list[object] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "ColumnRef":
                    refs.append(value.get("fields") or [])
                elif key == "RangeVar":
                    names.add(value.get("relname", ""))
                elif key == "alias" and isinstance(value, dict):
                    names.add(value.get("aliasname", ""))
                elif key == "CommonTableExpr":
                    names.add(value.get("ctename", ""))
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    for fields in refs:
        if any("A_Star" in f for f in fields):
            return True
        if len(fields) == 1 and fields[0].get("String", {}).get("sval") in names:
            return True
    return False

_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relnatts FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""
_ATTRIBUTES = """
SELECT a.attrelid, a.attnum, a.attname, a.atttypid FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attname = ANY(%s)
"""
_USER_COLUMNS = """
SELECT a.attrelid, a.attnum, a.attname, a.atttypid FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'
ORDER BY a.attrelid, a.attnum
"""
_VIEW_DEPENDENCIES = """
SELECT DISTINCT r.ev_class, d.refobjid, d.refobjsubid FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
WHERE d.refobjid <> r.ev_class
"""
_UNIQUE_COLUMNS = """
SELECT DISTINCT d.refobjid, d.refobjsubid FROM pg_index i
JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid AND d.refclassid = 'pg_class'::regclass
WHERE (i.indisunique OR i.indisexclusion) AND d.refobjsubid > 0
"""
_VIEW_DEFINITIONS = """
SELECT c.oid, pg_get_viewdef(c.oid) FROM pg_class c WHERE c.oid = ANY(%s) AND c.relkind IN ('v', 'm')
"""
_COMMENTS = """
SELECT d.objoid, d.objsubid, a.attname, a.atttypid, d.description FROM pg_description d
JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid
WHERE d.classoid = 'pg_class'::regclass AND d.objsubid > 0 AND NOT a.attisdropped
  AND d.description LIKE '%%dbguard:mask=%%'
"""
_USER_FUNCTIONS = """
SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # r table, p partitioned, v view, m materialized view, f foreign table
    natts: int  # columns when the snapshot was taken: a higher attribute number is newer than the snapshot


@dataclasses.dataclass(slots=True)
class Snapshot:
    relations: dict[int, Relation]
    by_name: dict[str, list[Relation]]  # relname -> relations of that name in any schema
    attributes: dict[tuple[int, int], tuple[str, int]]  # (relation oid, attnum) -> (column, type oid)
    view_deps: dict[int, set[tuple[int, int]]]  # view oid -> (relation oid, attnum) its rules read; 0 = whole row
    user_functions: frozenset[str]
    table_columns: dict[int, list[tuple[str, int]]]  # user relation oid -> [(column, attnum)] in order (COPY)
    comments: dict[tuple[int, int], CommentMask]  # (relation oid, attnum) -> the mask its comment declares
    version: int
    taken: float
    # Views over candidate relations whose definition references no whole row (``row_to_json(c)``,
    # ``c.*``): their dependencies then name every column they read.
    views_without_whole_rows: frozenset[int] = frozenset()
    # (relation oid, attnum) in a unique index or exclusion constraint (expression indexes included):
    # writing such a column answers whether a value exists.
    unique_attributes: frozenset[tuple[int, int]] = frozenset()


class IdentityMasks:
    """One identity's masks resolved against one snapshot: what the wire and the checker consult."""

    def __init__(self, masks: MaskSet, snap: Snapshot) -> None:
        self.masks = masks
        self.snapshot = snap
        self.by_attribute: dict[tuple[int, int], tuple[ColumnMask, int]] = {}
        masked_rel: dict[int, set[str]] = {}
        for (oid, attnum), (column, typ) in snap.attributes.items():
            rel = snap.relations.get(oid)
            if rel is None:
                continue
            mask = masks.lookup(rel.schema, rel.name, column, snap.comments.get((oid, attnum)))
            if mask is not None:
                self.by_attribute[(oid, attnum)] = (mask, typ)
                masked_rel.setdefault(oid, set()).add(column)
        self.masked_relations = {oid: frozenset(cols) for oid, cols in masked_rel.items()}
        self._views = self._views_reaching(snap)

    def _views_reaching(self, snap: Snapshot) -> set[int]:
        reaching: set[int] = set()
        changed = True
        while changed:  # views over views: until nothing new
            changed = False
            for view, deps in snap.view_deps.items():
                if view in reaching:
                    continue
                for oid, attnum in deps:
                    # A whole-row reference (row_to_json(c)) records no dependency on the masked
                    # columns it carries: only a definition proven free of them is let through.
                    if (oid, attnum) in self.by_attribute or oid in reaching or (
                            oid in self.masked_relations and view not in snap.views_without_whole_rows):
                        reaching.add(view)
                        changed = True
                        break
        return reaching

    def _relations(self, schema: str | None, name: str) -> Iterable[Relation]:
        return [r for r in self.snapshot.by_name.get(name, ()) if schema is None or r.schema == schema]

    def masked_columns(self, schema: str | None, name: str) -> frozenset[str]:
        out: set[str] = set()
        for rel in self._relations(schema, name):
            out |= self.masked_relations.get(rel.oid, frozenset())
        return frozenset(out)

    def view_reaches_masked(self, schema: str | None, name: str) -> bool:
        return any(rel.oid in self._views for rel in self._relations(schema, name))

    def is_user_function(self, name: str) -> bool:
        return name in self.snapshot.user_functions

    def unique_masked(self, schema: str | None, name: str) -> frozenset[str]:
        """Masked columns of the table that a unique index or exclusion constraint covers."""
        out: set[str] = set()
        unique = self.snapshot.unique_attributes
        for rel in self._relations(schema, name):
            for (oid, attnum) in self.by_attribute:
                if oid == rel.oid and (oid, attnum) in unique:
                    out.add(self.snapshot.attributes[(oid, attnum)][0])
        return frozenset(out)

    def all_columns(self, schema: str | None, name: str) -> frozenset[str] | None:
        """Every column of a user table (None for unknown or system relations)."""
        rel = self.relation(schema, name)
        if rel is None or rel.oid not in self.snapshot.table_columns:
            return None
        return frozenset(c for c, _ in self.snapshot.table_columns[rel.oid])

    def knows_attribute(self, table_oid: int, attnum: int) -> bool:
        """False for a column of a relation created or altered after the snapshot."""
        rel = self.snapshot.relations.get(table_oid)
        return rel is not None and attnum <= rel.natts

    def relation(self, schema: str | None, name: str) -> Relation | None:
        """The relation a name means; unqualified: the one in public, else the only one of that name."""
        found = list(self._relations(schema, name))
        if schema is None and len(found) > 1:
            found = [r for r in found if r.schema == "public"] or found
        return found[0] if len(found) == 1 else None

    def knows(self, schema: str | None, name: str) -> bool:
        return bool(list(self._relations(schema, name)))


class Catalog:
    """The proxy's catalog snapshot and its refreshes (one at a time; callers share the result)."""

    def __init__(self, upstream: UpstreamSettings, column_names: frozenset[str], *, max_age: float = 30.0,
                 read_comments: bool = False) -> None:
        self.read_comments = read_comments  # a `fromComments` masking rule: columns declared by comment
        self._upstream = upstream
        self._columns = sorted(column_names)
        self.max_age = max_age
        self.snapshot: Snapshot | None = None
        self._refreshing: asyncio.Task | None = None
        self._version = 0
        self._resolved: dict[tuple[int, int], IdentityMasks] = {}
        self.stale = True

    def _conninfo(self) -> dict[str, object]:
        return self._upstream.conninfo("dbguard-catalog")

    async def _load(self) -> Snapshot:
        async with await psycopg.AsyncConnection.connect(**self._conninfo(), autocommit=True) as conn:
            rels = {oid: Relation(oid, nsp, name, kind, natts) for oid, nsp, name, kind, natts in
                    await (await conn.execute(_RELATIONS)).fetchall()}
            attrs = {(oid, num): (name, typ) for oid, num, name, typ in
                     await (await conn.execute(_ATTRIBUTES, (self._columns,))).fetchall()}
            deps: dict[int, set[tuple[int, int]]] = {}
            for view, oid, attnum in await (await conn.execute(_VIEW_DEPENDENCIES)).fetchall():
                deps.setdefault(view, set()).add((oid, attnum))
            funcs = frozenset(name for (name,) in await (await conn.execute(_USER_FUNCTIONS)).fetchall())
            comments: dict[tuple[int, int], CommentMask] = {}
            if self.read_comments:
                for oid, num, name, typ, text in await (await conn.execute(_COMMENTS, ())).fetchall():
                    declared = parse_comment(text)
                    if declared is not None:
                        if declared[0] not in MASK_STRATEGIES:
                            log.warning("column comment on %s asks for unknown masking strategy %r; redacting",
                                        name, declared[0])
                            declared = ("redact", ())
                        comments[(oid, num)] = declared
                        attrs[(oid, num)] = (name, typ)
            # A view's dependencies name the columns it reads, but a whole-row reference names
            # none of the columns it carries: look for one in the definition.
            candidates = {oid for oid, _ in attrs}
            views = [v for v, d in deps.items() if any(oid in candidates for oid, _ in d)]
            plain = frozenset(v for v, text in await (await conn.execute(_VIEW_DEFINITIONS, (views,))).fetchall()
                              if text is not None and not references_whole_rows(text))
            unique = frozenset((oid, num) for oid, num in await (await conn.execute(_UNIQUE_COLUMNS)).fetchall())
            table_columns: dict[int, list[tuple[str, int]]] = {}
            for oid, num, name, _typ in await (await conn.execute(_USER_COLUMNS)).fetchall():
                table_columns.setdefault(oid, []).append((name, num))
        by_name: dict[str, list[Relation]] = {}
        for rel in rels.values():
            by_name.setdefault(rel.name, []).append(rel)
        self._version += 1
        return Snapshot(rels, by_name, attrs, deps, funcs, table_columns, comments, self._version,
                        time.monotonic(), plain, unique)

    async def current(self) -> Snapshot:
        """The snapshot, refreshed first if it is stale or too old."""
        snap = self.snapshot
        if snap is None or self.stale or time.monotonic() - snap.taken > self.max_age:
            await self.refresh()
        assert self.snapshot is not None
        return self.snapshot

    async def refresh(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        self.stale = False
        try:
            self.snapshot = await self._load()
        except BaseException:
            self.stale = True
            raise
        self._resolved.clear()
        log.debug("catalog snapshot %d: %d relations, %d candidate columns", self.snapshot.version,
                  len(self.snapshot.relations), len(self.snapshot.attributes))

    def resolve(self, masks: MaskSet, snap: Snapshot) -> IdentityMasks:
        key = (id(masks), snap.version)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolved[key] = IdentityMasks(masks, snap)
        return found
