"""Who may talk to the server, and which files a request may name.

- **Loopback by default.** Listening on another address without a token is refused
  (:func:`check_bind`).
- **Token.** With a token, every HTTP request and websocket needs it: ``Authorization: Bearer
  <token>``, a ``token`` query parameter, or the ``graphsd_token`` cookie that a request carrying
  the query parameter sets (HttpOnly, SameSite=Lax), so a browser logs in once with
  ``http://host:port/?token=...``. Otherwise: 401.
- **Host.** A server on a loopback address answers only requests whose ``Host`` is a loopback
  name or address: a web page whose own domain was made to resolve to 127.0.0.1 (DNS rebinding)
  is refused.
- **Origin.** A request that changes something (not GET/HEAD) or opens a websocket must come from
  the server's own page: an ``Origin`` other than the server's, or a ``Sec-Fetch-Site`` other
  than ``same-origin`` / ``none``, is refused, so a page on another site (or another port of
  localhost) cannot queue prompts, upload files or listen to the websocket. Clients that are not
  browsers send neither header.
- **Files.** Names from requests (``/view``, uploads, user data) are confined to their folder by
  :func:`confined`: no absolute paths, no ``..``, no symbolic links on the way.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

COOKIE = "graphsd_token"
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


class Refused(Exception):
    """A request names a file it may not: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine's
    loopback."""
    host = host.strip().lower().strip("[]")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str | None:
    """Why the server must not listen on ``host`` (None when it may)."""
    if is_loopback(host) or token:
        return None
    return (
        f"refusing to listen on {host} without a token: anyone who can reach that address could run workflows, "
        "read every output and fill the disk. Pass --token SECRET (or set GRAPHSD_SERVER_TOKEN), or listen on 127.0.0.1"
    )


def split_host(value: str) -> tuple[str, str | None]:
    """``Host`` header → (host, port or None); IPv6 addresses keep no brackets."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1 :]
        return host.lower(), rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        host, port = value.split(":")
        return host.lower(), port
    return value.lower(), None


class Guard:
    """The request checks of the module docstring, for one server."""

    def __init__(self, bind_host: str, token: str | None):
        self.token = token or None
        self.loopback_only = is_loopback(bind_host)

    def host_problem(self, host_header: str | None) -> str | None:
        if not self.loopback_only:
            return None
        host, _ = split_host(host_header or "")
        if not host or not is_loopback(host):
            return (
                f"this server answers only requests to a loopback address (Host {host_header!r} is not one); "
                "a server meant for other machines is started with --host and --token"
            )
        return None

    def origin_problem(
        self, method: str, websocket: bool, host_header: str | None, origin: str | None, fetch_site: str | None
    ) -> str | None:
        if method in ("GET", "HEAD", "OPTIONS") and not websocket:
            return None
        if fetch_site and fetch_site.lower() not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {fetch_site}); only the server's own page may do this"
        if origin is None:
            return None
        parts = urlsplit(origin)
        if origin == "null" or parts.scheme not in ("http", "https") or not parts.netloc:
            return f"request from origin {origin!r} refused; only the server's own page may do this"
        if split_host(parts.netloc) != split_host(host_header or "") and not self._same_default_port(
            parts.scheme, parts.netloc, host_header
        ):
            return f"request from origin {origin!r} refused: it is not this server ({host_header}); only the server's own page may do this"
        return None

    @staticmethod
    def _same_default_port(scheme: str, netloc: str, host_header: str | None) -> bool:
        """``http://h`` and Host ``h:80`` are the same origin."""
        default = "80" if scheme == "http" else "443"
        a, b = split_host(netloc), split_host(host_header or "")
        return a[0] == b[0] and (a[1] or default) == (b[1] or default)

    def token_ok(self, authorization: str | None, query_token: str | None, cookie_token: str | None) -> bool:
        if self.token is None:
            return True
        candidates = [query_token, cookie_token]
        if authorization and authorization.lower().startswith("bearer "):
            candidates.append(authorization[7:].strip())
        return any(c is not None and hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates)


def confined(root: str | Path, name: str, what: str = "file") -> Path:
    """``root / name`` after checking that ``name`` is a relative path inside ``root`` that passes
    through no symbolic link (and has no ``..``, NUL, backslash or drive letter). Raises
    :class:`Refused` (403)."""
    if not isinstance(name, str) or "\0" in name or "\\" in name:
        raise Refused(f"{what} name {name!r} is not allowed", 403)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise Refused(f"{what} name {name!r} is an absolute path; give a name inside the folder", 403)
    rel = PurePosixPath(name)
    if ".." in rel.parts:
        raise Refused(f"{what} name {name!r} leaves its folder ('..' is not allowed)", 403)
    base = Path(root).resolve()
    path = base.joinpath(*[p for p in rel.parts if p not in ("", ".")])
    probe = base
    for part in path.relative_to(base).parts:
        probe = probe / part
        if probe.is_symlink():
            raise Refused(f"{what} name {name!r} passes through a symbolic link, which is not followed", 403)
    return path
