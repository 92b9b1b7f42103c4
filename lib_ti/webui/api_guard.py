"""Who may call the /ti-trainer/v1 routes, decided as the host decides for /sdapi/v1:

- the routes exist only when the WebUI runs with --api or --nowebui (webui.py: `create_api` only
  then), so a plain WebUI has no training API at all;
- --api-auth "user:pass,..." puts HTTP Basic auth on every route (modules/api/api.py);
- a browser page may call them only from the server's own origin or one the host's CORS options
  allow (--cors-allow-origins, --cors-allow-origins-regex, matched like starlette's CORSMiddleware,
  which the host installs with exactly these). The host's middleware only adds headers: a "simple"
  cross-site POST (no preflight) would still run, so the origin is checked here, and bodies must be
  application/json, which a page can send cross-site only after a preflight the host refuses.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

MAX_BODY_BYTES = 2**20


def _cmd_opts() -> Any:
    from modules import shared

    return shared.cmd_opts


def routes_enabled() -> bool:
    """The host's rule for its own API routes: --api, or --nowebui (API-only mode)."""
    opts = _cmd_opts()
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


# ---------------------------------------------------------------- auth


def api_users() -> dict[str, str] | None:
    """None when --api-auth is off; else user -> password, parsed as the host does ("u:p,u2:p2").
    Read per request so a relaunch with other flags needs no re-registration."""
    raw = getattr(_cmd_opts(), "api_auth", None)
    if not raw:
        return None
    users = {}
    for entry in str(raw).split(","):
        user, sep, password = entry.partition(":")  # the host splits on every ':'; we allow one in passwords
        if sep:
            users[user] = password
    return users  # set but malformed: {} locks every route rather than leaving them open


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from an `Authorization: Basic ...` header, or None. Parsed here rather than
    by fastapi's HTTPBasic, which answers 401 to a malformed header even when auth is off."""
    scheme, _, param = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(param.strip(), validate=True).partition(b":")
    except ValueError:  # binascii.Error is one
        return None
    return (user, password) if sep else None


def require_auth(request: Request) -> None:
    users = api_users()
    if users is None:
        return
    given = basic_credentials(request.headers.get("authorization", ""))
    ok = False
    if given is not None:
        for user, password in users.items():  # no early exit: timing tells nothing about which user matched
            ok |= secrets.compare_digest(given[0], user.encode()) & secrets.compare_digest(
                given[1], password.encode())
    if not ok:
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})


# ---------------------------------------------------------------- origin


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        port = -1  # never equal to a real port
    return (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def same_origin(origin: str, host_header: str) -> bool:
    """Origin's host and port equal the Host header's (the scheme may differ behind a TLS proxy)."""
    o = urlsplit(origin)
    if o.scheme not in ("http", "https") or not o.netloc or not host_header:
        return False
    return _host_port(o.netloc, o.scheme) == _host_port(host_header, o.scheme)


def cors_allowed(origin: str) -> bool:
    """starlette's CORSMiddleware.is_allowed_origin with the options the host gives it."""
    opts = _cmd_opts()
    listed = getattr(opts, "cors_allow_origins", None)
    if listed:
        allowed = str(listed).split(",")
        if "*" in allowed or origin in allowed:
            return True
    regex = getattr(opts, "cors_allow_origins_regex", None)
    if regex:
        try:
            return re.compile(regex).fullmatch(origin) is not None
        except re.error:
            return False
    return False


def require_origin(request: Request) -> None:
    """No Origin (curl, scripts): fine. A browser's Origin must be ours or one the host allows."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    if same_origin(origin, request.headers.get("host", "")) or cors_allowed(origin):
        return
    raise HTTPException(status_code=403, detail="requests from another web site are refused; allow its origin "
                        "with the WebUI's --cors-allow-origins or --cors-allow-origins-regex")


# ---------------------------------------------------------------- body


async def json_body(request: Request) -> bytes:
    """The raw body of a POST: application/json only (415), at most MAX_BODY_BYTES (413), read in
    chunks so an endless body stops at the limit."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(status_code=415, detail="the body must be JSON sent as Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(status_code=413, detail=f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(status_code=413, detail=f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
