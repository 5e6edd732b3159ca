"""A real OPA binary (built from its Go module by scripts/build-test-tools.sh) and a real OPA server."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import urllib.request

import pytest

from tests.fix_postgres import free_port, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent


def opa_binary() -> pathlib.Path:
    """The OPA binary: $DBGUARD_OPA, or built (once, cached) by scripts/build-test-tools.sh. Never skipped."""
    if os.environ.get("DBGUARD_OPA"):
        return pathlib.Path(os.environ["DBGUARD_OPA"])
    tools = pathlib.Path(os.environ.get("DBGUARD_TOOLS_DIR", pathlib.Path.home() / ".cache" / "dbguard-tools"))
    binary = tools / "bin" / "opa"
    if not binary.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-tools.sh"), "opa"], check=True)
    return binary


@dataclasses.dataclass
class OpaServer:
    url: str
    proc: subprocess.Popen


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def opa() -> pathlib.Path:
    return opa_binary()


@pytest.fixture(scope="session")
def opa_server(opa: pathlib.Path) -> OpaServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(opa), "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _healthy(url), timeout=30, what="OPA server")
        yield OpaServer(url=url, proc=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
