"""A fresh ``dbguard proxy`` per test: the real command, in its own process, on a free port."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.fix_postgres import APP_PASSWORD, Postgres, free_port, stop_process, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = ROOT / "examples" / "policy.yaml"
EXAMPLE_TOKENS = ROOT / "examples" / "tokens.yaml"
EXAMPLE_MASKING = ROOT / "examples" / "masking.yaml"
TOKENS = {"alice": "alice-dev-token", "bob": "bob-dba-token", "copilot": "copilot-agent-token",
          "sam": "sam-support-token", "frida": "frida-fraud-token"}


@dataclasses.dataclass
class Proxy:
    port: int
    proc: subprocess.Popen
    events_path: pathlib.Path
    log_path: pathlib.Path

    def dsn(self, user: str = "alice", **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "dbname": "app", "user": user,
                 "password": TOKENS.get(user, "x"), "sslmode": "disable"}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self, user: str = "alice") -> str:
        return f"postgresql://{user}:{TOKENS[user]}@127.0.0.1:{self.port}/app"

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        text = self.events_path.read_text()
        text = text[:text.rfind("\n") + 1]  # a last line still being written is read next time
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_proxy(pg: Postgres, tmp: pathlib.Path, *extra: str, policy: pathlib.Path | None = None,
                upstream: str | None = None) -> Proxy:
    port = free_port()
    events = tmp / "events.jsonl"
    log = tmp / "proxy.log"
    args = [sys.executable, "-m", "dbguard", "proxy", "--listen", f"127.0.0.1:{port}",
            "--upstream", upstream or pg.app_url.replace(f":{APP_PASSWORD}@", "@"), "--policy",
            str(policy or EXAMPLE_POLICY),
            "--events", str(events), *extra]
    if not {"--workload-identity", "--tokens", "--auth", "--workload-token-file"} & set(extra):
        args += ["--tokens", str(EXAMPLE_TOKENS)]
    # The password goes in the environment, as in production: never in the process list.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DBGUARD_UPSTREAM_PASSWORD": APP_PASSWORD}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)  # noqa: SIM115
    proxy = Proxy(port=port, proc=proc, events_path=events, log_path=log)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(port), timeout=30, what="proxy to listen")
    except TimeoutError:
        proxy.stop()
        raise
    if proc.poll() is None and "--events" not in extra:
        # It listens a moment before it records the policies it loaded: tests read that event.
        wait_until(lambda: proc.poll() is not None or any(e.get("kind") == "policy" for e in proxy.events()),
                   timeout=10, what="the proxy's policy event")
    if proc.poll() is not None:
        raise RuntimeError(f"dbguard proxy exited with {proc.returncode}:\n{proxy.log()}")
    return proxy


@pytest.fixture
def proxy(pg: Postgres, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Proxy:
    p = start_proxy(pg, tmp_path)
    yield p
    p.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- dbguard proxy log ----\n" + p.log()[-6000:])
