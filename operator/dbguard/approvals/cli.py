"""``dbguard approve | deny | cancel | approvals``: decide on requests in the local store.

In a cluster, approvers patch the ApprovalRequest with kubectl instead (docs/approvals.md).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import sys

from dbguard.approvals import decisions
from dbguard.approvals.local import LocalStore

STORE_HELP = "the proxy's --approvals SQLite file (default: $DBGUARD_APPROVALS)"


def _store(args: argparse.Namespace) -> LocalStore | None:
    path = args.store or os.environ.get("DBGUARD_APPROVALS", "")
    if not path:
        print("dbguard: give the approval store with --store FILE or $DBGUARD_APPROVALS", file=sys.stderr)
        return None
    if not os.path.exists(path):
        print(f"dbguard: no approval store at {path}", file=sys.stderr)
        return None
    return LocalStore(path)


def add_decide_arguments(p: argparse.ArgumentParser, *, decision: str) -> None:
    p.add_argument("name", help="the approval request (named in the client's error or notice)")
    p.add_argument("--store", default="", metavar="FILE", help=STORE_HELP)
    p.add_argument("--as", dest="user", default="", metavar="USER",
                   help="who decides (default: your login name); taken on trust in the local store")
    p.add_argument("--group", action="append", default=[], metavar="GROUP", help="the decider's groups (repeatable)")
    p.add_argument("--reason", default="", help="why (a change ticket, e.g. CHG-42)")
    p.set_defaults(func=run_decide, decision=decision)


def run_decide(args: argparse.Namespace) -> int:
    store = _store(args)
    if store is None:
        return 2
    user = args.user or getpass.getuser()
    try:
        request = store.decide_sync(args.name, user, tuple(args.group), args.decision, args.reason)
    except decisions.Refused as exc:
        print(f"dbguard: refused: {exc}", file=sys.stderr)
        return 1
    status = request.doc.get("status") or {}
    print(f"{request.name}: {status.get('phase')}" + (f" (by {status['decidedBy']})" if status.get("decidedBy") else
                                                      f" ({len(request.spec.get('approvals') or [])} of "
                                                      f"{request.spec.get('minApprovals', 1)} approvals)"))
    return 0


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="", metavar="FILE", help=STORE_HELP)
    p.add_argument("--all", action="store_true", help="also decided, executed and expired requests")
    p.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    if store is None:
        return 2
    now = datetime.datetime.now(datetime.UTC)
    print(f"{'NAME':<32} {'REQUESTER':<16} {'OPERATION':<10} {'PHASE':<10} {'EXPIRES':<21} RULE")
    for r in store.list_sync():
        phase = r.phase(now)
        if not args.all and phase not in ("Pending", "Approved"):
            continue
        spec = r.spec
        print(f"{r.name:<32} {spec['requester']['user']:<16} {spec.get('operation', ''):<10} {phase:<10} "
              f"{spec['expiresAt']:<21} {spec['rule']['name']}")
        print(f"    {spec['statement'][:200]}")
    return 0
