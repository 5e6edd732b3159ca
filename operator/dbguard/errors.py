"""The dbguard error tree and the Refusal value type."""

from __future__ import annotations

import dataclasses

from dbguard.sqlstate import SqlState


class DbguardError(Exception):
    """Base of every error dbguard raises on purpose."""


class ConfigError(DbguardError):
    """A setting, policy file or token file is invalid; the message says where."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a statement or message is refused: becomes one ErrorResponse."""

    sqlstate: SqlState
    message: str
    rule: str = ""
    detail: str = ""
    hint: str = ""


class RefusedError(DbguardError):
    """Raised where a Refusal must unwind the current step."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
