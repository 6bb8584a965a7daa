"""What a request must look like before any route sees it: a known Host, no foreign origin.

A browser lets any web page send requests to 127.0.0.1. Two attacks follow, and both are
refused here for every route:

* DNS rebinding: a page at ``evil.example`` re-points its name to 127.0.0.1 and then reads the
  answers as its own. The browser still sends ``Host: evil.example``, so only the names the server
  is bound to (and the configured public names) are accepted; others answer 400.
* Cross-site requests: a page posts a form or a ``text/plain`` body (no preflight needed). The
  browser marks it with ``Origin`` (``null`` from sandboxes and some forms) and with
  ``Sec-Fetch-Site``; a request whose ``Origin`` is not the server's own origin, or that a browser
  marks ``cross-site`` or ``same-site``, answers 403. Clients that are not browsers send neither.

Job uploads must also declare a binary content type (see :data:`JOB_CONTENT_TYPES`), which a page
cannot send without a CORS preflight, which this server never grants.
"""

from __future__ import annotations

import urllib.parse

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

JOB_CONTENT_TYPES = ("application/octet-stream", "application/x-npz")
BROWSER_ONLY_SITES = ("cross-site", "same-site")  # Sec-Fetch-Site values of another site or port


def split_host(value: str) -> tuple[str, str]:
    """``Host`` header -> (lower-case name without brackets, port text or "")."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.lstrip(":")
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


class RequestGuard:
    """ASGI middleware that refuses unknown Host names and browser requests from other origins."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self.problem(headers)
        if problem is not None:
            status, message = problem
            await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def problem(self, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        name, port = split_host(host)
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return 400, f"this backend does not answer to the host name {name!r}"
        site = headers.get("sec-fetch-site", "").lower()
        if site in BROWSER_ONLY_SITES:
            return 403, f"requests from other web sites are refused (Sec-Fetch-Site: {site})"
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, name, port):
            return 403, f"requests from other web pages are refused (Origin: {origin[:100]})"
        return None


def same_origin(origin: str, host: str, port: str) -> bool:
    """The ``Origin`` header names this server as the request reached it (scheme's default port allowed)."""
    if origin.strip().lower() == "null":
        return False
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        origin_port = parts.port
    except ValueError:
        return False
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname.lower() == host and (origin_port or default) == (int(port) if port.isdigit() else default)
