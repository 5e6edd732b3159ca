"""The ``dbguard`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbguard",
        description="Identity-aware PostgreSQL governance: proxy, offline policy checks, audit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from dbguard.policy import check

    p_check = sub.add_parser(
        "check",
        help="decide a statement offline (no database) or run a table of expected decisions",
        description="Evaluate GuardrailPolicy files against a statement (--sql) or a YAML table of cases "
        "(--cases) without any database. Prints the decision as JSON; with --cases exits 1 on a mismatch.",
    )
    check.add_arguments(p_check)
    p_check.set_defaults(func=check.run)

    from dbguard.audit import cli as audit_cli

    p_audit = sub.add_parser("audit", help="verify and search the tamper-evident audit ledger",
                             description="Verify the ledger's hash chain and signed checkpoints, or answer "
                             "who/what/when questions from its indexes.")
    audit_cli.add_arguments(p_audit)
    p_audit.set_defaults(func=audit_cli.run)

    try:
        from dbguard.session import cli as proxy_cli
    except ImportError:  # pragma: no cover - while the proxy package is being built
        proxy_cli = None
    if proxy_cli is not None:
        p_proxy = sub.add_parser(
            "proxy",
            help="serve PostgreSQL clients and decide every statement",
            description=proxy_cli.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        proxy_cli.add_arguments(p_proxy)
        p_proxy.set_defaults(func=proxy_cli.run)
    from dbguard.approvals import cli as approvals_cli

    for command, decision, text in (("approve", "Approved", "approve a held statement"),
                                    ("deny", "Denied", "deny a held statement"),
                                    ("cancel", "Cancelled", "cancel your own approval request")):
        p_decide = sub.add_parser(command, help=f"{text} (local approval store)",
                                  description=f"{text[0].upper()}{text[1:]} in the local approval store (the proxy's "
                                  "--approvals FILE), with the same rules as the operator's webhooks: no "
                                  "self-approval, approver groups only, decisions are final, expired requests "
                                  "cannot be decided. In Kubernetes, patch the ApprovalRequest instead.")
        approvals_cli.add_decide_arguments(p_decide, decision=decision)
    p_list = sub.add_parser("approvals", help="list approval requests in the local store",
                            description="List the pending (or, with --all, every) approval request.")
    approvals_cli.add_list_arguments(p_list)

    from dbguard.controller import cli as operator_cli

    p_operator = sub.add_parser("operator", help="run the Kubernetes operator and its admission webhooks",
                                description=operator_cli.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    operator_cli.add_arguments(p_operator)
    p_operator.set_defaults(func=operator_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
