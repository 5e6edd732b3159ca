"""Optional notification of approvers: a Slack-compatible incoming webhook (``{"text": ...}``).

Off unless a URL is given. Sent from a background thread with retries (1 s, 2 s, 4 s) so a slow
or broken chat service never delays a statement; failures are logged and counted, never raised.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)
ATTEMPTS = 4


class Notifier:
    def __init__(self, url: str, *, timeout_s: float = 5.0, backoff_s: float = 1.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.sent = 0
        self.failed = 0

    def send(self, text: str, **fields: object) -> threading.Thread:
        """Post in the background; returns the thread (tests join it)."""
        payload = json.dumps({"text": text, **fields}).encode()
        thread = threading.Thread(target=self._post, args=(payload,), name="dbguard-notify", daemon=True)
        thread.start()
        return thread

    def _post(self, payload: bytes) -> None:
        for attempt in range(ATTEMPTS):
            req = urllib.request.Request(self.url, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        return
            except (urllib.error.URLError, OSError) as exc:
                log.warning("approval notification attempt %d failed: %s", attempt + 1, exc)
            if attempt + 1 < ATTEMPTS:
                time.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        log.error("approval notification to %s given up after %d attempts", self.url.split("?")[0], ATTEMPTS)


def created_text(name: str, requester: str, statement: str, rule: str, reason: str, hint: str) -> str:
    return (f"dbguard: {requester} asks to run a statement held by rule {rule} ({reason}).\n"
            f"Request {name}:\n```{statement[:1500]}```\nApprove: {hint}")


def decided_text(name: str, phase: str, decided_by: str) -> str:
    return f"dbguard: approval request {name} is {phase}" + (f" by {decided_by}" if decided_by else "")
