"""Kubernetes bearer tokens, verified by the API server (TokenReview, authentication.k8s.io/v1).

The proxy posts the client's token with ``spec.audiences: [AUDIENCE]`` and trusts the answer only
when ``status.authenticated`` is true *and* ``status.audiences`` contains AUDIENCE (an API server
that ignores audiences would otherwise accept tokens meant for itself). The identity is
``status.user.username`` and ``status.user.groups``.

The proxy's own credentials need ``create`` on ``tokenreviews`` (the ClusterRole
``system:auth-delegator``); see docs/identity.md.

The kubernetes client is synchronous: calls run on a small thread pool of their own, never on the
event loop, and every call is bounded by ``timeout`` (queueing included). Successful reviews are
cached for ``cache_ttl`` seconds (never past the token's own ``exp``) under the SHA-256 of the
token; the token itself is not kept. Rejections are not cached. Concurrent logins with the same
token share one review.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import os
import time
from typing import Any

from dbguard.errors import ConfigError
from dbguard.identity import authenticator
from dbguard.identity.principal import Principal

log = logging.getLogger("dbguard.identity")


def load_api_client(kubeconfig: str = "") -> Any:  # kubernetes.client.ApiClient
    """API client from --kubeconfig, else $KUBECONFIG, else the pod's in-cluster config, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        if kubeconfig:
            if not os.path.isfile(kubeconfig):
                raise ConfigError(f"--kubeconfig {kubeconfig}: no such file")
            return config.new_client_from_config(config_file=kubeconfig)
        if os.environ.get("KUBECONFIG"):
            return config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)  # re-reads the rotating pod token
            return client.ApiClient(cfg)
        home = os.path.expanduser("~/.kube/config")
        if os.path.exists(home):
            return config.new_client_from_config(config_file=home)
        raise ConfigError("no Kubernetes credentials to verify tokens with: give --kubeconfig FILE, "
                          "set $KUBECONFIG, or run the proxy in a pod (in-cluster config)")
    except config.ConfigException as exc:
        raise ConfigError(f"Kubernetes client configuration: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"--kubeconfig {kubeconfig}: {exc.strerror}") from exc


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # urllib3.MaxRetryError wraps the socket error
    return f"{type(exc).__name__}: {reason or exc}"[:300]


class TokenReviewer:
    """Authenticator for Kubernetes tokens (``--auth tokenreview``), also used by the workload identity."""

    source = "tokenreview"

    def __init__(self, api_client: Any, *, audience: str, timeout: float = 5.0, cache_ttl: float = 60.0,
                 cache_size: int = 10_000) -> None:
        from kubernetes import client

        self._client = client
        self._api = client.AuthenticationV1Api(api_client)
        self.audience = audience
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[bytes, tuple[float, Principal]] = collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[Principal]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dbguard-tokenreview")
        self.reviews = 0  # calls made to the API server

    # -- the blocking call ---------------------------------------------------------------------

    def review(self, token: str) -> Principal:
        """One TokenReview, blocking; raises Rejected or Unavailable."""
        from kubernetes.client.exceptions import ApiException

        body = self._client.V1TokenReview(spec=self._client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        self.reviews += 1
        try:
            result = self._api.create_token_review(body, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 403:
                raise authenticator.Unavailable(
                    "the proxy may not create tokenreviews (403 Forbidden): bind its ServiceAccount to the "
                    "ClusterRole system:auth-delegator") from None
            if exc.status == 401:
                raise authenticator.Unavailable(
                    "the Kubernetes API server does not accept the proxy's own credentials (401)") from None
            raise authenticator.Unavailable(f"TokenReview failed: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3, socket, TLS: the API server is unreachable
            raise authenticator.Unavailable(f"the Kubernetes API server is unreachable ({_describe(exc)})") from None
        status = result.status
        if status is None or not status.authenticated:
            error = (status.error if status is not None else "") or "the token is not valid"
            raise authenticator.Rejected(f"the Kubernetes API server rejected the token: {error}")
        if self.audience not in (status.audiences or []):
            raise authenticator.Rejected(f"the Kubernetes API server did not confirm the audience {self.audience!r} "
                                         f"(confirmed: {status.audiences or 'none'})")
        user = status.user
        if user is None or not user.username:
            raise authenticator.Rejected("the TokenReview names no user")
        return Principal(user=user.username, groups=tuple(user.groups or ()), source=self.source)

    # -- the async face ------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        if not token:
            raise authenticator.Rejected("no token was sent as the password")
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(digest)
                return hit[1]
            del self._cache[digest]
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._review(token, digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._settled(digest, t))
        return await asyncio.shield(task)  # one waiter giving up does not cancel the others' review

    def _settled(self, digest: bytes, task: asyncio.Task[Principal]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have given up already

    async def _review(self, token: str, digest: bytes) -> Principal:
        loop = asyncio.get_running_loop()
        try:
            principal = await asyncio.wait_for(loop.run_in_executor(self._pool, self.review, token), self.timeout)
        except TimeoutError:
            raise authenticator.Unavailable(
                f"the Kubernetes API server did not answer the TokenReview within {self.timeout:g}s") from None
        ttl = self.cache_ttl
        exp = authenticator.expiry(token)
        if exp is not None:
            ttl = min(ttl, exp - time.time())
        if ttl > 0:
            self._cache[digest] = (time.monotonic() + ttl, principal)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return principal

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
