"""Output paths confined to the output directory, and atomic writes that never replace what
graphsd did not write.

Every output is written to a temporary file (or folder) beside its target and then moved into
place, so a reader never sees half a file. Temporaries are named
``.graphsd-<host>-<pid>-<random>...tmp``: the process deletes its own on success, failure,
Ctrl-C and SIGTERM (:func:`remove_temporaries`), and a later write into the same folder deletes
those a killed process of this host left behind (:func:`sweep_stale_temporaries`). Written
files get the usual permissions (``0666`` / ``0777`` less the umask), not the private mode of a
temporary file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from graphsd.errors import NodeError


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a file's or folder's content, for cache keys: the resolved path and the
    relative name, size and modification time of every file in it (no hashing of contents), so it
    changes when a file is replaced. ``missing:<path>`` when nothing is there."""
    root = Path(path).resolve()
    if not root.exists():
        return f"missing:{root}"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256(str(root).encode())
    for f in files:
        st = f.stat()
        name = f.relative_to(root) if root.is_dir() else f.name
        digest.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def safe_output_path(output_dir: str | Path, name: str, field: str = "prefix") -> Path:
    """``output_dir / name`` after checking that it stays inside ``output_dir`` and names
    something in it: no absolute path, no ``..`` component, no symlink that leads outside, and
    not the output directory itself (``.``). Raises NodeError."""
    if not name or name.strip() != name:
        raise NodeError(f"'{name}' is not a usable file name (empty or surrounded by spaces)", field=field)
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise NodeError(f"'{name}' is an absolute path; outputs are written inside the output directory only", field=field)
    if ".." in rel.parts or "\\" in name:
        raise NodeError(f"'{name}' leaves the output directory ('..' or '\\' is not allowed)", field=field)
    if "\0" in name:
        raise NodeError(f"{name!r} contains a NUL character", field=field)
    root = Path(output_dir).resolve()
    target = (root / rel).resolve()
    if target == root or name.endswith(("/.", "/")) or rel.name in ("", "."):
        raise NodeError(f"'{name}' names the output directory itself; give a file or folder name inside it", field=field)
    if root not in target.parents:
        raise NodeError(f"'{name}' resolves outside the output directory (through a symbolic link)", field=field)
    return root / rel


def check_output_dir(output_dir: str | Path) -> str | None:
    """What is wrong with ``output_dir`` as a place to write (it, or a folder above it, is a
    file), or None. It need not exist yet."""
    path = Path(output_dir).absolute()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                what = "is a file" if place == path else f"cannot be created: {place} is a file"
                return f"the output directory {path} {what}; choose a folder (--output-dir)"
            if not os.access(place, os.W_OK | os.X_OK):
                return f"the output directory {path} cannot be written ({place} is not writable); choose another (--output-dir)"
            return None
    return None


# ---- temporaries ----------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
_TEMP_RE = re.compile(r"^\.graphsd-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")
_live: set[Path] = set()
_live_lock = threading.Lock()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextmanager
def _temporary(directory: Path, suffix: str, folder: bool = False) -> Iterator[Path]:
    """A new temporary file (or folder) in ``directory``, removed on the way out unless it was
    moved away; registered so an abort can remove it."""
    directory.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(directory)
    prefix = f".graphsd-{_HOST}-{os.getpid()}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix + ".tmp", dir=directory))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix + ".tmp", dir=directory)
        os.close(fd)
        tmp = Path(name)
    with _live_lock:
        _live.add(tmp)
    try:
        yield tmp
    finally:
        _remove(tmp)
        with _live_lock:
            _live.discard(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_temporaries() -> None:
    """Delete every temporary this process has open (called before an abort)."""
    with _live_lock:
        for tmp in list(_live):
            _remove(tmp)
        _live.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in ``directory`` that a process of this host left behind when it
    was killed (its pid no longer runs). Returns what was deleted."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and entry.name.endswith(".tmp") and m["host"] == _HOST and not _alive(int(m["pid"])):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


# ---- writing --------------------------------------------------------------------------------
def _publish(tmp: Path, folder: bool) -> None:
    """Give a finished temporary the permissions a plain new file or folder gets."""
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_UMASK)


def _alternatives(path: Path) -> Iterator[Path]:
    """``path``, then ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ..."""
    yield path
    n = 2
    while True:
        yield path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1


def write_atomic(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and move it into place. An
    existing file is replaced (atomically) only when ``overwrite`` is set; otherwise the next
    free name ``<stem>_2<suffix>``, ... is taken. A folder is never replaced. Returns the
    path written."""
    if path.is_dir():
        raise NodeError(f"{path} is a folder; a file cannot replace it")
    with _temporary(path.parent, path.suffix) as tmp:
        write(tmp)
        _publish(tmp, folder=False)
        if overwrite:
            os.replace(tmp, path)
            return path
        return _claim(tmp, _alternatives(path))


def write_numbered(directory: Path, prefix: str, suffix: str, write: Callable[[Path], None], start: int = 1) -> Path:
    """Write a new file ``<prefix>_<NNNNN><suffix>`` in ``directory`` without ever replacing an
    existing one."""
    name = Path(prefix).name
    with _temporary(directory, suffix) as tmp:
        write(tmp)
        _publish(tmp, folder=False)
        existing = [p.name for p in directory.glob(f"{glob_escape(name)}_*{suffix}")]
        n = max([start - 1] + [_number(e, name, suffix) for e in existing]) + 1
        return _claim(tmp, (directory / f"{name}_{i:05d}{suffix}" for i in range(n, n + 10**6)))


def _claim(tmp: Path, names: Iterator[Path]) -> Path:
    """Link ``tmp`` to the first of ``names`` that does not exist (a hard link fails if the
    name exists, so two writers never take the same one)."""
    for final in names:
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            continue
    raise NodeError(f"no free file name left beside {tmp.parent}")


def write_folder_atomic(
    path: Path, write: Callable[[Path], None], overwrite: bool = False, replaceable: Callable[[Path], bool] = lambda p: False
) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``path`` and move it into place.
    Without ``overwrite`` nothing existing is touched: a taken name gives ``<name>_2``, ... With
    ``overwrite`` an existing folder is replaced, atomically, only if ``replaceable(path)``
    says it is of the kind being written (e.g. a model folder); anything else is refused."""
    with _temporary(path.parent, "", folder=True) as tmp:
        write(tmp)
        _publish(tmp, folder=True)
        if overwrite and path.exists():
            if not (path.is_dir() and replaceable(path)):
                raise NodeError(f"{path} exists and is not a folder of the kind being saved; it is left alone (choose another name)")
            with _temporary(path.parent, ".old", folder=True) as old:
                os.rename(path, old)  # onto the empty temporary folder
                try:
                    os.rename(tmp, path)
                except OSError:
                    os.rename(old, path)  # put the old one back before the temporary goes
                    raise
            return path
        names = _alternatives(path)
        while True:
            final = next(names)
            try:
                os.rename(tmp, final)  # fails on an existing file or a non-empty folder
                return final
            except OSError as exc:
                if not final.exists():
                    raise NodeError(f"cannot write {final}: {exc.strerror or exc}") from None


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _number(name: str, prefix: str, suffix: str) -> int:
    core = name[len(prefix) + 1 : len(name) - len(suffix)]
    return int(core) if core.isdigit() else 0
