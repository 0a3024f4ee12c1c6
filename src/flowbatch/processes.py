"""Process workers: a stage's calls in spawned interpreters, one ``setup()`` each.

Each worker has two pipes: calls go out through an asyncio write transport
(a large item never blocks the event loop), answers come back through a
read transport, so the event loop itself is woken by an answer. The idle
worker used last takes the next call. A worker that dies fails only the call
it held (``WorkerCrashed``, its cause chained) and is replaced; its exit code
is waited for off the event loop. The pool resizes (``resize(n)``, ``grow()``,
``shrink()``; with ``concurrency=fb.Adaptive(...)`` the runner does it, see
replicas.py): a new worker is set up before it takes a call, a retired one
goes when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import pickle
import re
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .errors import PipelineError, WorkerCrashed
from .executors import (
    Activate,
    CallTimedOut,
    Executor,
    RemoteError,
    Unpicklable,
    _no_coroutine,
    _portable,
    _resolve,
    _setup_error,
)
from .hooks import activated

if TYPE_CHECKING:
    from .stage import Stage

__all__ = ["ProcessExecutor"]


_MAIN_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]""")


def _unguarded_script() -> str | None:
    """The main script's path when it has no ``if __name__ == "__main__":`` guard."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return None if _MAIN_GUARD.search(source) else path


def _start_up_error(stage: str, exc: BaseException) -> PipelineError:
    """A process worker died before it was ready: say what usually causes it."""
    script = _unguarded_script()
    if script is None:
        return _setup_error(stage, exc)
    err = PipelineError(
        f"stage {stage!r}: {exc}. "
        f"The script {script} runs its pipeline without an "
        "'if __name__ == \"__main__\":' guard: each worker process is a fresh "
        "interpreter that imports the main script, so code at its top level runs "
        "again in every worker. Put the code that runs the pipeline under "
        "'if __name__ == \"__main__\":' (functions and stages stay at top level)."
    )
    err.__cause__ = exc
    return err


#: An answer whose arrays travel out of band starts with this byte (a pickle
#: starts with its protocol opcode, 0x80): then a 4-byte count of buffers, an
#: 8-byte length for each, the pickle, and the buffers' raw bytes.
_BUFFERS = b"B"


def _dumps_answer(value: tuple[bool, Any]) -> bytes:
    """``value`` pickled; arrays in it (numpy and other buffer-protocol
    objects that support pickle protocol 5) as raw bytes beside the pickle,
    not copied into it."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return data
    raws = [b.raw() for b in buffers]
    head = [_BUFFERS, len(raws).to_bytes(4, "little")]
    head += [r.nbytes.to_bytes(8, "little") for r in raws]
    return b"".join([*head, len(data).to_bytes(8, "little"), data, *raws])


def _loads_answer(data: bytes) -> Any:
    """The inverse of :func:`_dumps_answer`; arrays come back writable."""
    if data[:1] != _BUFFERS:
        return pickle.loads(data)
    view = memoryview(data)
    count = int.from_bytes(view[1:5], "little")
    at = 5 + 8 * count
    sizes = [int.from_bytes(view[5 + 8 * i : 13 + 8 * i], "little") for i in range(count)]
    size = int.from_bytes(view[at : at + 8], "little")
    pickled = view[at + 8 : at + 8 + size]
    at += 8 + size
    buffers = []
    for n in sizes:
        buffers.append(bytearray(view[at : at + n]))  # a copy the caller may write to
        at += n
    return pickle.loads(pickled, buffers=buffers)


def _encode_result(out: Any) -> bytes:
    try:
        return _dumps_answer((True, out))
    except Exception as exc:
        why: BaseException = exc
    if isinstance(out, list) and any(isinstance(x, BaseException) for x in out):
        # A batch result holding an exception that cannot travel: make it portable.
        fixed = [_portable(x) if isinstance(x, BaseException) else x for x in out]
        try:
            return pickle.dumps((True, fixed))
        except Exception as exc:
            why = exc
    err = RemoteError(
        f"the result ({type(out).__name__}) could not be pickled back from "
        f"the worker process: {type(why).__name__}: {why}"
    )
    return pickle.dumps((False, err))


# A frame on a worker's pipes: 8-byte little-endian length, then a pickle.
_HEADER = 8
_STOP = b""  # an empty frame tells a worker process to finish (a pickle is never empty)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_HEADER, "little") + data


def _read_exactly(fd: int, n: int) -> bytes | None:
    """``n`` bytes from a blocking ``fd``; None at end of file."""
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


#: The environment variables by which math and tokenizer libraries size their
#: thread pools, read once when each library loads.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",  # Hugging Face tokenizers
)


@contextlib.contextmanager
def _thread_env(threads: int | None) -> Any:
    """Around a spawn: the child's environment sizes its libraries' thread pools.

    Set in the parent because a spawned child imports the main script (and
    maybe torch or numpy with it) before any code of ours runs there. A
    variable the user already set wins. Restored at once (the loop's thread
    is the only one that spawns).
    """
    if threads is None:
        yield
        return
    added = [v for v in THREAD_VARS if v not in os.environ]
    for v in added:
        os.environ[v] = str(threads)
    try:
        yield
    finally:
        for v in added:
            os.environ.pop(v, None)


def _size_torch(threads: int | None) -> None:
    """torch, when the main script imported it before the environment counted,
    gets its intra-op threads set here (a user's own ``setup()`` may set them
    again: it runs after this)."""
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads)))


#: Calls in a row made while no other worker was busy before a call may use
#: every core (see ``ProcessExecutor.lone_threads``).
LONE_RUN = 8

# This worker's torch threads: [its own share, now]; share -1: never retuned
# (set at the first call, after setup()).
_torch_threads = [0, 0]


def _retune_torch(lone: int, threads: int) -> None:
    """Before a call: all ``threads`` when the parent says this worker runs
    alone (``lone``), else the worker's own share. Only torch can change its
    pool between calls; and only where torch still has the share flowbatch
    gave it (a ``setup()`` that set its own count keeps it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    share, now = _torch_threads
    if not share:
        share = now = torch.get_num_threads()
        if share != int(os.environ.get("OMP_NUM_THREADS", share)):
            share = -1  # setup() chose its own count: keep it
        _torch_threads[:] = [share, now]
    if share < 0:
        return
    want = threads if lone else share
    if want != now:
        torch.set_num_threads(want)
        _torch_threads[1] = want


def _process_main(
    requests: Connection,
    answers: Connection,
    payload: bytes,
    post: Callable[[Any], Any] | None,
    activate: Activate | None,
    *,
    threads: int | None = None,
    lone_threads: int | None = None,
) -> None:
    """Body of a worker process: set up once, then answer calls until told to stop.

    Calls come as frames on ``requests``; each answer, a pickled
    ``(ok, value)``, goes back as a frame on ``answers``. Plain blocking
    reads and writes: this process does one thing at a time.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    rfd, wfd = requests.fileno(), answers.fileno()
    try:
        _size_torch(threads)
        fn = pickle.loads(payload)
        setup = getattr(fn, "setup", None)
        if callable(setup):
            setup()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _write_all(wfd, _frame(pickle.dumps((False, _portable(exc)))))
        return
    try:
        _write_all(wfd, _frame(pickle.dumps((True, os.getpid()))))
    except OSError:
        return  # the parent stopped before we were ready
    while True:
        try:
            head = _read_exactly(rfd, _HEADER)
            data = _read_exactly(rfd, int.from_bytes(head, "little")) if head else None
        except OSError:
            break
        if not data:
            break  # end of file (the parent is gone) or the parent's "stop"
        try:
            if lone_threads:
                _retune_torch(data[0], lone_threads)
            arg, carrier = pickle.loads(memoryview(data)[1:])
            with activated(activate, carrier):
                out = _no_coroutine(fn(arg))
            if post is not None:
                out = post(out)
        except BaseException as exc:
            msg = pickle.dumps((False, _portable(exc)))
        else:
            msg = _encode_result(out)
        del data
        try:
            _write_all(wfd, _frame(msg))
        except OSError:
            break
    teardown = getattr(fn, "teardown", None)
    if callable(teardown):
        teardown()


class _Answers(asyncio.Protocol):
    """Reads a worker's answer frames on the event loop; notices its death.

    The worker's end of the answer pipe closes when it exits, is stopped or
    dies, whatever the cause: ``connection_lost`` reports it.
    """

    def __init__(self, executor: ProcessExecutor, proc: _Proc) -> None:
        self.executor = executor
        self.proc = proc
        self.chunks: list[bytes] = []
        self.have = 0
        self.need = -1  # the length of the frame being read; -1: its header first

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.have += len(data)
        while True:
            want = _HEADER if self.need < 0 else self.need
            if self.have < want:
                return
            chunks = self.chunks
            buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            rest = buf[want:]
            self.chunks = [rest] if rest else []
            self.have = len(rest)
            if self.need < 0:
                self.need = int.from_bytes(buf[:_HEADER], "little")
                continue
            self.need = -1
            self.executor._answer(self.proc, buf[:want])

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.executor._died(self.proc, exc)


class _Requests(asyncio.BaseProtocol):
    """The write side of a worker's request pipe (writes never block the loop)."""

    def __init__(self, executor: ProcessExecutor, proc: _Proc) -> None:
        self.executor = executor
        self.proc = proc

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # the worker's end closed under a write: it died
            self.executor._died(self.proc, exc)


class _Proc:
    __slots__ = ("answers", "dead", "fut", "process", "ready", "requests", "retired")

    def __init__(self, process: Any, fut: asyncio.Future[Any]) -> None:
        self.process = process
        self.fut = fut
        self.dead = False
        self.ready = False  # set once its setup() has succeeded
        self.retired = False  # stopped by a shrink: its exit is no crash
        self.requests: asyncio.WriteTransport | None = None
        self.answers: asyncio.ReadTransport | None = None


class ProcessExecutor(Executor):
    """``workers`` spawned processes; a dead one is replaced, failing only its call.

    Each worker has two pipes: calls go out through an asyncio write
    transport (a large item never blocks the event loop), answers come back
    through a read transport, so the event loop itself is woken by an answer
    (no thread in between: one wake-up less per call, which on an idle
    machine is a good part of the hop's cost). The answer pipe closing tells
    that the worker exited, was stopped or died.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int,
        stage: str,
        post: Callable[[Any], Any] | None = None,
        activate: Activate | None = None,
        *,
        cpu_threads: int | None = None,
        lone_threads: int | None = None,
    ) -> None:
        self.stage = stage
        self.workers = workers
        self.post = post
        self.activate = activate
        #: Math-library threads per worker process (None: the libraries' own default).
        self.cpu_threads = cpu_threads
        #: torch threads for a call while no other worker is busy (None: never
        #: more than ``cpu_threads``): a lone request gets every core.
        self.lone_threads = lone_threads
        self._busy = 0
        self._lone_run = 0
        try:
            self._payload = pickle.dumps(fn)
        except Exception as exc:
            raise PipelineError(
                f"stage {stage!r} runs in worker processes, but its function cannot be "
                f"pickled ({type(exc).__name__}: {exc}); define it at module level"
            ) from exc
        self._ctx = mp.get_context("spawn")
        # Last in, first out: at low load one warm worker (its model's
        # weights in the CPU caches) takes every call; the others join in as
        # the load grows.
        self._idle: asyncio.LifoQueue[_Proc] = asyncio.LifoQueue()
        self._procs: set[_Proc] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._broken: BaseException | None = None
        self.restarts = 0
        # Replicas: the fewest allowed, and the count kept (live, starting or
        # being replaced); the most is ``workers``.
        self._lo = 1
        self._size = workers
        self._resizing: asyncio.Lock | None = None

    async def start(self, stage: Stage | None = None) -> None:
        adaptive = stage.adaptive if stage is not None else None
        # concurrency=fb.Adaptive(...): start with its start count; the runner
        # grows and shrinks the pool between min and max (``workers``).
        self._lo = adaptive.min if adaptive is not None else 1
        self._size = min(adaptive.start, self.workers) if adaptive is not None else self.workers
        procs = await asyncio.gather(*(self._spawn() for _ in range(self._size)))
        results = await asyncio.gather(*(p.fut for p in procs), return_exceptions=True)
        for r in results:
            if isinstance(r, WorkerCrashed):  # died before it could answer at all
                await self.stop()
                raise _start_up_error(self.stage, r) from r
            if isinstance(r, BaseException):
                await self.stop()
                raise _setup_error(self.stage, r) from r
        for p in procs:
            p.ready = True
            self._idle.put_nowait(p)

    async def _spawn(self) -> _Proc:
        loop = asyncio.get_running_loop()
        req_r, req_w = self._ctx.Pipe(duplex=False)
        ans_r, ans_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_process_main,
            args=(req_r, ans_w, self._payload, self.post, self.activate),
            kwargs={"threads": self.cpu_threads, "lone_threads": self.lone_threads},
            name=f"flowbatch-{self.stage}",
            daemon=True,
        )
        try:
            with _thread_env(self.cpu_threads):
                process.start()
        finally:
            req_r.close()
            ans_w.close()
        proc = _Proc(process, loop.create_future())
        self._procs.add(proc)
        # The transports own their pipes from here on (and close them).
        proc.answers, _ = await loop.connect_read_pipe(
            lambda: _Answers(self, proc), _own_file(ans_r, "rb")
        )
        proc.requests, _ = await loop.connect_write_pipe(
            lambda: _Requests(self, proc), _own_file(req_w, "wb")
        )
        return proc

    def _answer(self, proc: _Proc, data: bytes) -> None:
        try:
            ok, value = _loads_answer(data)
        except Exception as exc:
            ok, value = False, RemoteError(f"could not unpickle the worker's answer: {exc!r}")
        _resolve(proc.fut, ok, value)

    def _died(self, proc: _Proc, cause: BaseException | None = None) -> None:
        """``proc``'s pipe closed: it exited, was stopped or died. Fail its
        call (once its exit code is known) and start its replacement.

        Never blocks the event loop: a process whose exit code is not known
        yet is waited for in a thread.
        """
        if proc.dead:
            return
        proc.dead = True
        self._procs.discard(proc)
        for transport in (proc.requests, proc.answers):
            if transport is not None:
                transport.close()
        if proc.process.exitcode is not None:  # a non-blocking poll
            self._report_death(proc, cause)
        else:
            self._own(self._reap(proc, cause))
        # A worker that never got through setup() is not replaced here: its
        # replacer reports the failure (else a broken setup would loop).
        if not self._closing and proc.ready and not proc.retired:
            self.restarts += 1
            self._own(self._replace())

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, proc: _Proc, cause: BaseException | None) -> None:
        try:
            # Its pipe closed, so it is exiting now; join it off the loop.
            await asyncio.to_thread(proc.process.join, 1.0)
        finally:
            self._report_death(proc, cause)

    def _report_death(self, proc: _Proc, cause: BaseException | None) -> None:
        code = proc.process.exitcode
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        held = "while it held this item" if proc.ready else "while starting"
        err = WorkerCrashed(
            f"worker process {proc.process.pid} of stage {self.stage!r} died ({how}) {held}"
        )
        err.__cause__ = cause
        _resolve(proc.fut, False, err)

    async def _replace(self) -> None:
        proc = await self._spawn()
        try:
            await proc.fut
        except BaseException as exc:
            # A replacement that cannot set up means the stage cannot run any
            # more: fail callers instead of letting them wait for a worker.
            self._broken = exc
            self._idle.put_nowait(proc)  # wakes a waiting caller, who sees _broken
            return
        proc.ready = True
        self._idle.put_nowait(proc)

    # ----------------------------------------------------------- resizing

    @property
    def replicas(self) -> int:
        """Worker processes kept now: running, starting, or being replaced."""
        return self._size

    async def resize(self, n: int) -> None:
        """Run ``n`` worker processes, between the stage's ``Adaptive.min`` (1
        for a fixed concurrency) and ``workers``: :meth:`grow` or :meth:`shrink`
        until there. Resizes run one at a time."""
        if isinstance(n, bool) or not isinstance(n, int) or not self._lo <= n <= self.workers:
            raise ValueError(
                f"stage {self.stage!r}: resize({n!r}) is outside "
                f"[min={self._lo}, max={self.workers}] worker processes"
            )
        if self._resizing is None:
            self._resizing = asyncio.Lock()
        async with self._resizing:
            while self._size < n:
                await self.grow()
            while self._size > n:
                await self.shrink()

    async def grow(self) -> None:
        """Start one more worker process; returns once its ``setup()`` has run
        and it takes calls. A setup that fails raises its error (the stage
        keeps the workers it had)."""
        if self._closing:
            raise RuntimeError(f"stage {self.stage!r}: the executor is stopping")
        if self._size >= self.workers:
            raise ValueError(
                f"stage {self.stage!r} already runs its most worker processes ({self.workers})"
            )
        self._size += 1
        task = asyncio.get_running_loop().create_task(self._add())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Shielded: a cancelled caller leaves the start to finish (or stop() to end it).
        await asyncio.shield(task)

    async def _add(self) -> None:
        try:
            proc = await self._spawn()
            await proc.fut
        except BaseException as exc:
            self._size -= 1
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, WorkerCrashed):
                raise _start_up_error(self.stage, exc) from exc
            raise _setup_error(self.stage, exc) from exc
        proc.ready = True
        self._idle.put_nowait(proc)

    async def shrink(self) -> None:
        """Stop one worker process once it is idle (its ``teardown()`` runs);
        never below the minimum. Returns once it has exited."""
        if self._size <= self._lo:
            raise ValueError(
                f"stage {self.stage!r} already runs its fewest worker processes ({self._lo})"
            )
        self._size -= 1
        try:
            while True:
                proc = await self._idle.get()
                if not proc.dead:
                    break
                # Died while idle: its replacement is (or will be) in the queue.
        except BaseException:
            self._size += 1
            raise
        proc.retired = True
        task = asyncio.get_running_loop().create_task(self._retire(proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _retire(self, proc: _Proc) -> None:
        if proc.requests is not None and not proc.requests.is_closing():
            proc.requests.write(_frame(_STOP))
        await asyncio.to_thread(proc.process.join, 30.0)  # off the loop: teardown() runs
        if proc.process.is_alive():
            proc.process.kill()
            await asyncio.to_thread(proc.process.join, 5.0)
        self._died(proc)  # closes its transports; no replacement: it was retired

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        try:
            data = pickle.dumps((arg, carrier))
        except Exception as exc:
            raise Unpicklable(
                f"the item ({type(arg).__name__}) cannot be pickled to send it to "
                f"worker processes: {type(exc).__name__}: {exc}"
            ) from exc
        while True:
            proc = await self._idle.get()
            if self._broken is not None:
                self._idle.put_nowait(proc)
                raise WorkerCrashed(
                    f"stage {self.stage!r} has no worker: a replacement process failed "
                    f"its setup: {self._broken!r}"
                ) from self._broken
            if not proc.dead:
                break
            # It died while idle; its replacement is (or will be) in the queue.
        assert proc.requests is not None
        loop = asyncio.get_running_loop()
        proc.fut = fut = loop.create_future()
        self._busy += 1
        # A lone call gets every core only once calls have come one at a time
        # for a while (LONE_RUN in a row): at one request at a time the model
        # runs on all cores; as soon as two overlap, each worker keeps its share
        # (two workers each on all cores would oversubscribe the machine).
        self._lone_run = self._lone_run + 1 if self._busy == 1 else 0
        lone = b"\x01" if self._lone_run > LONE_RUN else b"\x00"
        proc.requests.write(_frame(lone + data))
        try:
            if timeout is None:
                return await fut
            try:
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(fut)
            except TimeoutError as exc:
                # A process can be stopped: kill it; _died() fails fut and replaces it.
                proc.process.kill()
                self._died(proc)
                raise CallTimedOut(
                    f"stage {self.stage!r} call took longer than {timeout}s; "
                    "its worker process was killed and replaced"
                ) from exc
        finally:
            self._busy -= 1
            if not proc.dead:
                self._idle.put_nowait(proc)

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        procs = list(self._procs)
        for proc in procs:
            if proc.requests is not None and not proc.requests.is_closing():
                proc.requests.write(_frame(_STOP))
        for proc in procs:
            await asyncio.to_thread(proc.process.join, 5.0)
            if proc.process.is_alive():
                proc.process.kill()
                await asyncio.to_thread(proc.process.join, 5.0)
            self._died(proc)  # closes its transports (a no-op if they closed already)
        if self._tasks:  # deaths noticed while stopping: their exit codes are known now
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _own_file(conn: Connection, mode: str) -> Any:
    """A file object on ``conn``'s pipe, for a transport; ``conn`` is closed."""
    fd = os.dup(conn.fileno())
    conn.close()
    return os.fdopen(fd, mode, buffering=0)
