"""A minimal raw pgwire client: message sequences no driver would send (adversarial tests)."""
import socket
import struct


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body

def cstr(s: str) -> bytes:
    return s.encode() + b"\0"

class Raw:
    def __init__(self, port, user, password, db="app"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        params = cstr("user") + cstr(user) + cstr("database") + cstr(db) + b"\0"
        body = struct.pack("!i", 196608) + params
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        self.buf = b""
        while True:
            t, p = self.read()
            if t == b"R" and struct.unpack("!i", p[:4])[0] == 3:
                self.s.sendall(msg(b"p", cstr(password)))
            elif t == b"E":
                raise RuntimeError(p)
            elif t == b"Z":
                break

    def read(self):
        while len(self.buf) < 5:
            d = self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        t = self.buf[:1]
        n = struct.unpack("!i", self.buf[1:5])[0]
        while len(self.buf) < 1 + n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        p = self.buf[5:1 + n]
        self.buf = self.buf[1 + n:]
        return t, p

    def until_ready(self, count=1):
        out = []
        while count:
            t, p = self.read()
            out.append((t, p))
            if t == b"Z":
                count -= 1
        return out

    def send(self, data: bytes):
        self.s.sendall(data)

def parse(name, sql, types=()):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t) for t in types))

def bind(portal, stmt, params=(), formats=(), result_formats=()):
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return msg(b"B", body)

def execute(portal, limit=0):
    return msg(b"E", cstr(portal) + struct.pack("!i", limit))

def describe(kind, name):
    return msg(b"D", kind + cstr(name))

def query(sql):
    return msg(b"Q", cstr(sql))

SYNC = msg(b"S", b"")

def errors(out):
    res = []
    for t, p in out:
        if t in (b"E", b"N"):
            fields = {}
            for part in p.split(b"\0"):
                if part:
                    fields[chr(part[0])] = part[1:].decode(errors="replace")
            res.append((t.decode(), fields.get("C"), fields.get("M")))
        elif t == b"C":
            res.append(("C", p[:-1].decode()))
    return res
