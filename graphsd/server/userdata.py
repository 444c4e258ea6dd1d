"""The frontend's per-user storage: settings (``/settings``) and user files such as saved
workflows (``/userdata``), kept in ``<data dir>/user/default/`` (one user: the server has no
accounts; the token is the login).

File names arrive URL-encoded in one path segment (``workflows%2Fa.json``) and are confined to
the user folder (:func:`graphsd.server.security.confined`); writes are atomic.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from graphsd.paths import write_atomic
from graphsd.server.security import Refused, confined

SETTINGS_FILE = "comfy.settings.json"
MAX_USER_FILE = 64 * 1024 * 1024


def _writer(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def _json_error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def _info(path: Path, rel: str) -> dict[str, Any]:
    st = path.stat()
    return {"path": rel, "size": st.st_size, "modified": int(st.st_mtime * 1000), "created": int(st.st_ctime * 1000)}


class UserData:
    """Handlers for ``/users``, ``/settings`` and ``/userdata``."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- users and settings -------------------------------------------------------------------
    async def users(self, request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": True})

    def _settings(self) -> dict[str, Any]:
        path = self.root / SETTINGS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_settings(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2)
        write_atomic(self.root / SETTINGS_FILE, _writer(text.encode()), overwrite=True)

    async def get_settings(self, request: web.Request) -> web.Response:
        return web.json_response(self._settings())

    async def get_setting(self, request: web.Request) -> web.Response:
        return web.json_response(self._settings().get(request.match_info["id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        try:
            update = await request.json()
        except ValueError:
            return _json_error("the body must be a JSON object of settings", 400)
        if not isinstance(update, dict):
            return _json_error("the body must be a JSON object of settings", 400)
        with self._lock:
            self._save_settings({**self._settings(), **update})
        return web.Response(status=200)

    async def post_setting(self, request: web.Request) -> web.Response:
        try:
            value = await request.json()
        except ValueError:
            return _json_error("the body must be the setting's JSON value", 400)
        with self._lock:
            self._save_settings({**self._settings(), request.match_info["id"]: value})
        return web.Response(status=200)

    # ---- user files ---------------------------------------------------------------------------
    async def list_files(self, request: web.Request) -> web.Response:
        """``GET /userdata?dir=workflows&recurse=true&full_info=true&split=false``: 404 when the
        folder does not exist (the frontend reads that as empty)."""
        try:
            folder = confined(self.root, request.query.get("dir", ""), "folder")
        except Refused as exc:
            return _json_error(str(exc), exc.status)
        if not request.query.get("dir") or not folder.is_dir():
            return _json_error("no such folder", 404)
        recurse, full, split = _flag(request, "recurse", False), _flag(request, "full_info", False), _flag(request, "split", False)
        entries: list[Any] = []
        for path in sorted(folder.rglob("*") if recurse else folder.iterdir()):
            rel = path.relative_to(folder)
            if not path.is_file() or path.is_symlink() or any(p.startswith(".") for p in rel.parts):
                continue
            name = rel.as_posix()
            if full:
                entries.append(_info(path, name))
            elif split:
                entries.append([name, *rel.parts])
            else:
                entries.append(name)
        return web.json_response(entries)

    def _path(self, request: web.Request, key: str = "file") -> Path:
        return confined(self.root, request.match_info[key])

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        try:
            path = self._path(request)
        except Refused as exc:
            return _json_error(str(exc), exc.status)
        if not path.is_file():
            return _json_error("no such file", 404)
        return web.FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def post_file(self, request: web.Request) -> web.Response:
        try:
            path = self._path(request)
        except Refused as exc:
            return _json_error(str(exc), exc.status)
        if request.content_length is not None and request.content_length > MAX_USER_FILE:
            return _json_error(f"a user file may have at most {MAX_USER_FILE // (1024 * 1024)} MB", 413)
        body = await request.read()
        if path.is_dir():
            return _json_error("a folder has that name", 409)
        if path.exists() and not _flag(request, "overwrite", True):
            return _json_error("file exists", 409)
        with self._lock:
            write_atomic(path, _writer(body), overwrite=True)
        rel = path.relative_to(self.root.resolve()).as_posix()
        return web.json_response(_info(path, rel) if _flag(request, "full_info", False) else rel)

    async def delete_file(self, request: web.Request) -> web.Response:
        try:
            path = self._path(request)
        except Refused as exc:
            return _json_error(str(exc), exc.status)
        if not path.is_file():
            return _json_error("no such file", 404)
        path.unlink()
        return web.Response(status=204)

    async def move_file(self, request: web.Request) -> web.Response:
        try:
            source, dest = self._path(request, "file"), self._path(request, "dest")
        except Refused as exc:
            return _json_error(str(exc), exc.status)
        if not source.is_file():
            return _json_error("no such file", 404)
        if dest.exists() and not _flag(request, "overwrite", False):
            return _json_error("file exists", 409)
        dest.parent.mkdir(parents=True, exist_ok=True)
        source.replace(dest)
        rel = dest.relative_to(self.root.resolve()).as_posix()
        return web.json_response(_info(dest, rel) if _flag(request, "full_info", False) else rel)
