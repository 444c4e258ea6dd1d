"""A fork server for tests that need graphsd's command in a process of its own (signals, exit
codes, servers, hostile inputs) but not a fresh interpreter: a helper process imports graphsd
and the model libraries once (seconds of CPU), then forks one child per request, which runs
``python ARGS`` as a fresh interpreter would from that point (``-m MODULE``, ``-c CODE`` or a
script, as ``__main__``, in the given folder, environment (``PYTHONPATH`` on ``sys.path``) and
data-size limit, on the given stdin/stdout/stderr) and ends the way that interpreter would
(exit code, signal, traceback).

The helper runs no torch operation, so no thread pool exists when it forks; a child gets the
thread count a fresh interpreter would (``OMP_NUM_THREADS`` of its environment, else torch's
default). What cannot be forked stays a fresh process in its test: start-up itself (Ctrl-C
inside ``import torch``), what graphsd reads when imported (the umask), what is already
imported (the modules a plugin pulls in), hash seeds across processes, peak RSS (a child
inherits its parent's), and one run of the real command end to end (test_main_job.py).

Tests use :class:`ForkServer` (the ``forks`` fixture of conftest.py): ``popen()`` returns a
:class:`Forked`, which has the parts of ``subprocess.Popen`` the tests use."""

from __future__ import annotations

import io
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

PIPE = subprocess.PIPE
PRELOAD = (  # what `graphsd run` of an SD workflow and `graphsd serve` import on their way
    "graphsd.cli",
    "graphsd.engine",
    "graphsd.server",
    "diffusers:UNet2DConditionModel,AutoencoderKL,EulerDiscreteScheduler,DDIMScheduler,PNDMScheduler",
    "transformers:CLIPTextModel,CLIPTextModelWithProjection,CLIPTokenizer",
    "PIL.Image",
    "PIL.PngImagePlugin",
    "safetensors.torch",
    "websocket",
)


# ---- the helper process --------------------------------------------------------------------------
def _preload() -> None:
    """Import PRELOAD, every module of graphsd and of the installed plugins (their node modules
    are imported when an Engine is made), no more: nothing runs."""
    import importlib
    import importlib.metadata
    import pkgutil

    import graphsd

    for spec in PRELOAD:
        module, _, names = spec.partition(":")
        mod = importlib.import_module(module)
        for name in filter(None, names.split(",")):
            getattr(mod, name)
    packages = [graphsd] + [importlib.import_module(ep.value.split(":")[0]) for ep in importlib.metadata.entry_points(group="graphsd")]
    for package in packages:
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
            if not info.name.startswith("graphsd.distributed."):  # Ray: only a Ray test's server imports it
                importlib.import_module(info.name)


def _child(request: dict[str, Any], fds: list[int], threads: int) -> None:
    """In the forked child: become ``python ARGS`` (never returns)."""
    import runpy

    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("rlimit_data") is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (request["rlimit_data"], request["rlimit_data"]))
    import torch

    torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS") or threads))
    # fresh text streams on the new descriptors, buffered as a fresh interpreter's would be
    sys.stdin = io.TextIOWrapper(open(0, "rb", buffering=-1, closefd=False))
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=-1, closefd=False), line_buffering=os.isatty(1),
                                  write_through=bool(request["env"].get("PYTHONUNBUFFERED")))
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=-1, closefd=False), errors="backslashreplace",
                                  line_buffering=True)
    for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):  # as start-up puts them on sys.path
        if entry and entry not in sys.path:
            sys.path.insert(1, entry)
    args = request["args"]
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[0] = ""
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)  # preloaded
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = str(Path(args[0]).resolve().parent)
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as the interpreter ends on an uncaught Ctrl-C
        code = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at interpreter exit
    import atexit

    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def serve(path: str, owner: int) -> None:
    """The helper's loop: accept a request (JSON and three descriptors), fork, answer the child's
    pid, and its wait status when it ends; until the process ``owner`` (the pytest run) ends."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as `graphsd run` sets it before these imports
    _preload()
    import torch

    threads = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    print("ready", flush=True)
    while os.path.exists(f"/proc/{owner}") and os.path.exists(path):
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
                while data and not data.endswith(b"\n"):
                    more = conn.recv(1 << 16)
                    data = data + more if more else b""
                if not data:  # a probe (ForkServer._answers) or a client gone: no request
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                request = json.loads(data)
                _flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    for c in children.values():
                        c.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _child(request, fds, threads)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                children[pid] = conn
            else:
                os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{status}\n".encode())
                except OSError:  # the test side gave up on it
                    pass
                finally:
                    conn.close()
    Path(path).unlink(missing_ok=True)


# ---- the test side -------------------------------------------------------------------------------
class Forked:
    """A child of the fork server, with the parts of ``subprocess.Popen`` tests use: pid,
    stdout/stderr (when PIPE), poll, wait, communicate, send_signal, terminate, kill, returncode."""

    def __init__(self, args: list[str], conn: socket.socket, stdout: io.IOBase | None, stderr: io.IOBase | None):
        self.args = args
        self._conn = conn
        self._buf = b""
        self.pid = int(self._line(None))
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> str:
        """The server's next answer line ("" when it closed the connection); TimeoutError."""
        self._conn.settimeout(timeout)
        try:
            while b"\n" not in self._buf:
                chunk = self._conn.recv(4096)
                if not chunk:
                    return ""
                self._buf += chunk
        finally:
            self._conn.settimeout(None)
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._finish(self._line(0))
            except (TimeoutError, BlockingIOError):
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._finish(self._line(timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        assert self.returncode is not None
        return self.returncode

    def _finish(self, line: str) -> None:
        if not line:
            raise RuntimeError("the fork server ended before the child")
        self.returncode = os.waitstatus_to_exitcode(int(line))
        self._conn.close()

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        results: dict[str, Any] = {}
        readers = []
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                reader = threading.Thread(target=lambda s=stream, n=name: results.__setitem__(n, s.read()), daemon=True)
                reader.start()
                readers.append(reader)
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(deadline - time.monotonic(), 0))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The helper process of this pytest run, found through its socket in ``folder`` (shared by
    the xdist workers: the first to ask starts it; it ends with the run, the process ``owner``)."""

    def __init__(self, folder: Path, owner: int):
        import fcntl

        self.path = str(folder / "fork.sock")
        with open(folder / "fork.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._answers():
                self._start(folder, owner)

    def _answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _start(self, folder: Path, owner: int) -> None:
        Path(self.path).unlink(missing_ok=True)
        here = str(Path(__file__).parent)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        log = folder / "forkserver.log"
        with open(log, "a") as err:
            proc = subprocess.Popen([sys.executable, "-c", f"import forkserver; forkserver.serve({self.path!r}, {owner})"],
                                    stdin=subprocess.DEVNULL, stdout=PIPE, stderr=err, env=env, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start: {log.read_text()[-3000:]}")
        proc.stdout.close()

    def popen(self, args: list[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
              stdout: Any = PIPE, stderr: Any = PIPE, text: bool = True, rlimit_data: int | None = None) -> Forked:
        """Like ``subprocess.Popen(args, ...)`` with ``args[0]`` the Python interpreter: ``stdout``
        and ``stderr`` are PIPE, None (this process's) or an open file; ``rlimit_data`` (bytes,
        ``ulimit -d``) stands for a ``preexec_fn`` setting it. (No umask: graphsd.paths reads it
        when imported, so a test of the umask needs a fresh interpreter.)"""
        assert args[0] == sys.executable, "the fork server runs Python: python -m MODULE ..., python -c CODE ... or python SCRIPT ..."
        ours: list[int] = []
        theirs = [os.open(os.devnull, os.O_RDONLY)]
        streams: list[Any] = []
        for target, default in ((stdout, 1), (stderr, 2)):
            if target is PIPE:
                r, w = os.pipe()
                ours.append(r)
                theirs.append(w)
                streams.append(open(r, "r" if text else "rb"))
            else:
                theirs.append(os.dup(default if target is None else target.fileno()))
                streams.append(None)
        request = {"args": [str(a) for a in args[1:]], "cwd": str(cwd or os.getcwd()), "env": dict(os.environ if env is None else env),
                   "rlimit_data": rlimit_data}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        try:
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        return Forked(list(args), conn, *streams)

    def run(self, args: list[str], *, timeout: float | None = None, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(args, capture_output=True, text=True, ...)``."""
        proc = self.popen(args, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        done = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done
