"""The service's client, for the CLI and for replicas: JSON over the Unix socket (the kernel tells the
service who calls), or over TCP with a munge credential bound to each request (other login nodes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.errors import HpcserveError

if TYPE_CHECKING:
    import httpx

    from hpcserve.config import SiteConfig

SOCKET_ENV = "HPCSERVE_SOCKET"  # overrides service.socket (a test's service, a second instance)
TIMEOUT_S = 60.0


class ServiceUnavailable(HpcserveError):
    exit_code = 69  # EX_UNAVAILABLE


class ServiceError(HpcserveError):
    """The service refused or failed a request; the message is its one line."""

    def __init__(self, message: str, status: int, exit_code: int) -> None:
        super().__init__(message)
        self.status, self.exit_code = status, exit_code


class ServiceClient:
    """Calls the service at ``socket`` (Unix) or, when ``url`` is given, over TCP with munge."""

    def __init__(self, socket: Path | None, url: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.socket, self.url, self.timeout_s = socket, url, timeout_s
        self._client: httpx.Client | None = None

    @classmethod
    def for_site(cls, site: SiteConfig | None) -> ServiceClient:
        """The socket from $HPCSERVE_SOCKET, else the site's ``service.socket``; over TCP (``service.url``)
        when that socket is not on this host."""
        from hpcserve.config.sections import ServiceSettings

        settings = site.service if site is not None else ServiceSettings()
        path = Path(os.environ.get(SOCKET_ENV) or settings.socket)
        if not path.exists() and settings.url:
            return cls(None, settings.url)
        return cls(path)

    @property
    def where(self) -> str:
        return f"unix:{self.socket}" if self.socket is not None else str(self.url)

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """The JSON answer of ``method path``; ``ServiceError`` with the service's line when it refuses."""
        import httpx

        content = b"" if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if self.socket is None:
            from hpcserve.service.munge import authorization

            sent.setdefault("Authorization", authorization(method, path, content))
        try:
            response = self._http().request(method, path, content=content, headers=sent)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        return _answer(response)

    def _http(self) -> httpx.Client:
        import httpx

        if self._client is None:
            if self.socket is not None:
                transport = httpx.HTTPTransport(uds=str(self.socket))
                self._client = httpx.Client(
                    transport=transport, base_url="http://hpcserve", timeout=self.timeout_s
                )
            else:
                self._client = httpx.Client(base_url=str(self.url), timeout=self.timeout_s)
        return self._client

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        reason = str(exc) or type(exc).__name__
        return ServiceUnavailable(
            f"cannot reach the hpcserve service at {self.where}: {reason} (fix: ask your admin to start it "
            "with `systemctl start hpcserve`, or set service.socket in the site config / $HPCSERVE_SOCKET)"
        )


def _answer(response: httpx.Response) -> Any:
    try:
        data = response.json() if response.content else None
    except ValueError:
        data = None
    if response.is_success:
        return data
    if isinstance(data, dict) and "error" in data:
        raise ServiceError(str(data["error"]), response.status_code, int(data.get("exit_code") or 1))
    raise ServiceError(f"the service answered HTTP {response.status_code}", response.status_code, 1)
