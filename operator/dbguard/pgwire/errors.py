"""Protocol errors: whose fault it is decides how the session answers (as h11 does)."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base for wire-level errors; ``sqlstate`` goes into the FATAL/ERROR sent to the peer."""

    def __init__(self, message: str, *, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized or out of place."""


class LocalProtocolError(ProtocolError):
    """dbguard itself tried to do something the protocol does not allow (a bug)."""
