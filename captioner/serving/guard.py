"""Who may talk to the server: the Host and Origin checks, as the app's outermost layer.

`RequestGuard(app, allowed, cors_origin)` is pure ASGI (it never buffers a body). A request
whose `Host` is not an allowed name gets 400 (`allowed_hosts`: `serve.allowed_hosts`, by
default the bound host, localhost and 127.0.0.1; "*" allows any, "*.example.org" any name
under it; the health endpoints answer any Host), so a DNS-rebound page cannot read the API.
A request other than GET/HEAD carrying an `Origin` that is neither this server's own
(`same_origin`) nor `cors_origin` (`serve.cors_origin`) gets 403, so another site's form
cannot post photos. Both refusals are the one error shape. It also answers HEAD as GET
without its body, adds `X-Content-Type-Options: nosniff` to every response and the page's
Content-Security-Policy (`PAGE_CSP`: its own scripts, styles and API only) to the page's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captioner.config import ServeConfig
from captioner.serving.schemas import error_response

# Paths any Host may ask for: probes reach a server by its address, and they reveal nothing.
_HEALTH_PATHS = ("/health/", "/v2/health/")
# The page's own policy: its scripts, styles and API only; thumbnails are blob: URLs of the chosen files.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def allowed_hosts(limits: ServeConfig) -> list[str]:
    """The Host names requests may carry: serve.allowed_hosts, or the bound host, localhost and 127.0.0.1."""
    names = limits.allowed_hosts or [limits.host, "localhost", "127.0.0.1"]
    return list(dict.fromkeys(_host_name(name) for name in names))


def _split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or an allowed-host entry) -> (lower-case name without a trailing dot, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: [::1]:8000
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, None  # a name, an IPv4 address, or a bare IPv6 address (an allowed-host entry)
    return name.rstrip("."), port or None


def _host_name(value: str) -> str:
    return _split_host(value)[0]


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request's Host header names this server: an allowed name exactly, "*" (any),
    or "*.example.org" (any name under example.org)."""
    if not host:
        return False
    name = _host_name(host)
    for entry in allowed:
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's Origin ("http://name:port") is the server the request's Host names: the
    same name and port; a Host without a port (port 80 or 443, or a proxy that may have turned
    https into http) takes an Origin on either default port."""
    from urllib.parse import urlsplit

    if not host or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return False
    name, port = _split_host(host)
    if (parts.hostname or "").rstrip(".") != name:
        return False
    if port is None:  # the server is on a default port, or behind a proxy that may have changed the scheme
        return origin_port in (80, 443)
    return port.isdigit() and int(port) == origin_port


class RequestGuard:
    """The app's outermost layer (pure ASGI, so it never buffers a body): refuses a Host that is
    not ours (400) and, on methods other than GET and HEAD, an Origin that is neither ours nor
    `cors_origin` (403), both in the one error shape; answers HEAD as GET without its body;
    adds nosniff to every response and the page's policy to the page's."""

    def __init__(self, app: Any, allowed: Sequence[str], cors_origin: str) -> None:
        self.app = app
        self.allowed = list(allowed)
        self.cors_origin = cors_origin.rstrip("/").lower()

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host")
        path, method = scope["path"], scope["method"]
        if not path.startswith(_HEALTH_PATHS) and not host_allowed(host, self.allowed):
            return 400, (
                f"Host {host!r} is not a name of this server (serve.allowed_hosts, --allowed-host: "
                f"{', '.join(self.allowed)})" if host else "the request has no Host header"
            )
        origin = headers.get("origin")
        if method in ("GET", "HEAD") or origin is None or same_origin(origin, host):
            return None
        if self.cors_origin and origin.rstrip("/").lower() == self.cors_origin:
            return None
        return 403, f"cross-origin request from {origin} refused (serve.cors_origin, --cors-origin, allows one origin)"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def send_guarded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if page and b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}  # Content-Length stays the GET answer's
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await error_response(*refused)(scope, receive, send_guarded)
            return
        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send_guarded)
