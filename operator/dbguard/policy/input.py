"""The policy input document: a versioned JSON contract (docs/policy-input.md)."""

from __future__ import annotations

import datetime
import zoneinfo
from typing import Any

from dbguard.analyze.facts import StatementFacts
from dbguard.identity.principal import Principal

INPUT_SCHEMA_VERSION = 1
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SESSION_FIELDS = ("database", "user", "application_name", "client_addr", "protocol", "in_transaction")


def time_fields(now: datetime.datetime, timezones: tuple[str, ...] = ()) -> dict[str, Any]:
    """``input.time``: UTC, plus weekday and minute of day in every time zone the policy uses."""
    now = now.astimezone(datetime.UTC)
    zones = {}
    for tz in ("UTC", *timezones):
        local = now.astimezone(zoneinfo.ZoneInfo(tz))
        zones[tz] = {"weekday": _DAYS[local.weekday()], "minute_of_day": local.hour * 60 + local.minute}
    return {"utc": now.isoformat(timespec="seconds"), "weekday": zones["UTC"]["weekday"],
            "minute_of_day": zones["UTC"]["minute_of_day"], "zones": zones}


def build_input(principal: Principal, session: dict[str, Any], facts: StatementFacts, now: datetime.datetime,
                timezones: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "schema_version": INPUT_SCHEMA_VERSION,
        "identity": principal.to_dict(),
        "session": {k: session.get(k, False if k == "in_transaction" else "") for k in SESSION_FIELDS},
        "statement": facts.to_dict(),
        "time": time_fields(now, timezones),
    }
