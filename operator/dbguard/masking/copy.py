"""COPY ... TO STDOUT for identities with masks: which columns to mask, and masking each CopyData row.

COPY output carries no RowDescription, so the columns come from the statement and the catalog:
``COPY t [(cols)] TO STDOUT`` lists the table's columns (or the given ones) in order; ``COPY
(SELECT ...) TO STDOUT`` lists the query's output, which the lineage check has already limited to
plain columns wherever a masked column is involved. Text and CSV formats are masked field by field
(with their escaping and quoting rules, NULL kept as NULL); binary COPY of masked data is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pglast import ast

from dbguard.masking.catalog import IdentityMasks
from dbguard.masking.lineage import Refused
from dbguard.masking.strategies import mask_text


@dataclasses.dataclass(frozen=True, slots=True)
class CopyPlan:
    """How to mask one COPY's rows: field index -> text masker, and the format's rules."""

    maskers: dict[int, Callable[[str], str | None]]  # None: NULL
    csv: bool = False
    delimiter: str = "\t"
    null: str = "\\N"
    quote: str = '"'
    escape: str = '"'
    header: bool = False
    columns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.maskers)


def _options(stmt: ast.CopyStmt) -> dict[str, object]:
    out: dict[str, object] = {}
    for opt in stmt.options or ():
        value = opt.arg
        if isinstance(value, ast.String):
            value = value.sval
        elif isinstance(value, ast.Integer):
            value = value.ival
        elif isinstance(value, ast.Boolean):
            value = value.boolval
        elif value is None:
            value = True
        out[opt.defname.lower()] = value
    return out


def plan_copy(stmt: ast.CopyStmt, masks: IdentityMasks, hash_key: bytes) -> CopyPlan | None:
    """The plan for a COPY TO; None for COPY FROM (a write). Raises Refused for binary masked output."""
    if stmt.is_from or stmt.filename is not None or stmt.is_program:
        return None  # a write, or output that goes to a server file or program, not to the client
    columns = _output_columns(stmt, masks)
    maskers: dict[int, Callable[[str], str | None]] = {}
    names = []
    for i, (name, origin) in enumerate(columns):
        found = masks.by_attribute.get(origin) if origin else None
        if found is not None:
            mask = found[0]
            maskers[i] = _text_masker(mask.strategy, mask.opts, hash_key)
            names.append(name)
    opts = _options(stmt)
    fmt = str(opts.get("format", "text")).lower()
    if fmt == "binary" and maskers:
        raise Refused("binary COPY of masked columns cannot be masked; use FORMAT text or csv")
    if maskers and "encoding" in opts:
        raise Refused("COPY with ENCODING of masked columns: dbguard masks UTF-8 output only")
    if maskers and "null" in opts and fmt != "csv":
        # a value equal to the NULL string passes as "NULL": it would confirm a guessed value
        raise Refused("COPY with a NULL string of masked columns would confirm guessed values")
    csv = fmt == "csv"
    header = opts.get("header", False)
    return CopyPlan(maskers=maskers, csv=csv, delimiter=str(opts.get("delimiter", "," if csv else "\t")),
                    null=str(opts.get("null", "" if csv else "\\N")), quote=str(opts.get("quote", '"')),
                    escape=str(opts.get("escape", opts.get("quote", '"'))),
                    header=bool(header) and str(header).lower() not in ("false", "0", "off"), columns=tuple(names))


def _text_masker(strategy: str, options: dict, hash_key: bytes) -> Callable[[str], str | None]:
    """A field's text -> its masked text; None: the format's NULL (the ``null`` strategy)."""
    if strategy == "null":
        return lambda value: None
    return lambda value: mask_text(strategy, options, value, hash_key)


def _output_columns(stmt: ast.CopyStmt, masks: IdentityMasks) -> list[tuple[str, tuple[int, int] | None]]:
    """(name, (relation oid, attnum) or None) for each output column, in order."""
    snap = masks.snapshot
    if stmt.relation is not None:
        rel = masks.relation(stmt.relation.schemaname, stmt.relation.relname)
        if rel is None:
            raise Refused(f"COPY of {stmt.relation.relname}: dbguard does not know this relation")
        cols = snap.table_columns.get(rel.oid, [])
        if stmt.attlist:
            wanted = [a.sval for a in stmt.attlist]
            by_name = dict(cols)
            return [(c, (rel.oid, by_name[c]) if c in by_name else None) for c in wanted]
        return [(c, (rel.oid, num)) for c, num in cols]
    query = stmt.query
    if not isinstance(query, ast.SelectStmt) or not query.targetList:
        return []
    tables: list[tuple[str, int]] = []  # (name or alias, oid)

    def add(item: object) -> None:
        if isinstance(item, ast.RangeVar):
            rel = masks.relation(item.schemaname, item.relname)
            if rel is not None:
                tables.append((item.alias.aliasname if item.alias else item.relname, rel.oid))
        elif isinstance(item, ast.JoinExpr):
            add(item.larg)
            add(item.rarg)

    for item in query.fromClause or ():
        add(item)
    out: list[tuple[str, tuple[int, int] | None]] = []
    masking = any(oid in masks.masked_relations for _, oid in tables)
    for target in query.targetList:
        ref = target.val
        if not isinstance(ref, ast.ColumnRef):
            out.append((target.name or "?column?", None))
            continue
        names = [f.sval if isinstance(f, ast.String) else None for f in ref.fields]
        qualifier = names[-2] if len(names) >= 2 else None
        scope = [t for t in tables if qualifier is None or t[0] == qualifier]
        if names[-1] is None:  # * or t.*
            if masking and len(tables) > 1 and qualifier is None:
                # a join's * merges USING/NATURAL columns: the statement alone cannot say where each lands
                raise Refused("COPY of * over a join with masked columns: list the columns")
            for _, oid in scope:
                out += [(c, (oid, num)) for c, num in snap.table_columns.get(oid, [])]
            continue
        owners = [(oid, dict(snap.table_columns.get(oid, [])).get(names[-1])) for _, oid in scope]
        owners = [(oid, num) for oid, num in owners if num is not None]
        if len(owners) != 1 and masking:
            raise Refused(f"COPY column {'.'.join(n or '*' for n in names)}: dbguard cannot tell which table it "
                          "comes from, and the query reads masked columns")
        out.append((target.name or names[-1], owners[0] if len(owners) == 1 else None))
    return out


def mask_copy_row(data: bytes, plan: CopyPlan) -> bytes:
    """One CopyData row (a line with its newline) with the plan's fields masked."""
    line = data.decode("utf-8", "replace")
    end = "\n" if line.endswith("\n") else ""
    body = line[: len(line) - len(end)]
    if body.endswith("\r"):
        end = "\r" + end
        body = body[:-1]
    if plan.csv:
        fields = _split_csv(body, plan)
        out = []
        for i, (value, quoted) in enumerate(fields):
            masker = plan.maskers.get(i)
            if masker is not None and (quoted or value != plan.null):
                masked = masker(value)
                value, quoted = (plan.null, False) if masked is None else (masked, True)
            out.append(_quote_csv(value, plan) if quoted else value)
        return (plan.delimiter.join(out) + end).encode()
    fields_text = _split_text(body, plan.delimiter)
    for i, raw in enumerate(fields_text):
        masker = plan.maskers.get(i)
        if masker is not None and raw != plan.null:
            masked = masker(_unescape_text(raw))
            fields_text[i] = plan.null if masked is None else _escape_text(masked, plan.delimiter)
    return (plan.delimiter.join(fields_text) + end).encode()


def _split_text(body: str, delimiter: str) -> list[str]:
    fields, cur, i = [], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            cur.append(body[i:i + 2])
            i += 2
            continue
        if ch == delimiter:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    fields.append("".join(cur))
    return fields


_TEXT_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _unescape_text(raw: str) -> str:
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            out.append(_TEXT_ESCAPES.get(raw[i + 1], raw[i + 1]))
            i += 2
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)


def _escape_text(value: str, delimiter: str) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return value.replace(delimiter, "\\" + delimiter) if delimiter not in "\t\n\r\\" else value


def _split_csv(body: str, plan: CopyPlan) -> list[tuple[str, bool]]:
    fields: list[tuple[str, bool]] = []
    i, n = 0, len(body)
    while True:
        if i < n and body[i] == plan.quote:
            i += 1
            cur = []
            while i < n:
                ch = body[i]
                if ch == plan.escape and i + 1 < n and body[i + 1] in (plan.quote, plan.escape) and (
                        plan.escape != plan.quote or body[i + 1] == plan.quote):
                    cur.append(body[i + 1])
                    i += 2
                elif ch == plan.quote:
                    i += 1
                    break
                else:
                    cur.append(ch)
                    i += 1
            fields.append(("".join(cur), True))
        else:
            j = body.find(plan.delimiter, i)
            j = n if j < 0 else j
            fields.append((body[i:j], False))
            i = j
        if i >= n:
            break
        i += len(plan.delimiter)  # at a delimiter
        if i >= n:
            fields.append(("", False))
            break
    return fields


def _quote_csv(value: str, plan: CopyPlan) -> str:
    doubled = value.replace(plan.escape, plan.escape * 2) if plan.escape == plan.quote else \
        value.replace(plan.escape, plan.escape * 2).replace(plan.quote, plan.escape + plan.quote)
    return plan.quote + doubled + plan.quote
