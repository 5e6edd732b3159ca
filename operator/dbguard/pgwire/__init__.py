"""Sans-IO PostgreSQL wire protocol: framing, decoding, encoding. No sockets, no policy."""

from dbguard.pgwire import messages
from dbguard.pgwire.backend import BackendRelay, BackendStartupReader
from dbguard.pgwire.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dbguard.pgwire.frontend import NEED_DATA, FrontendParser, Phase

__all__ = [
    "NEED_DATA",
    "BackendRelay",
    "BackendStartupReader",
    "FrontendParser",
    "LocalProtocolError",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "messages",
]
