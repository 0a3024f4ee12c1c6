"""Stages on a Ray cluster: ``fb.ray.actors(...)``, a pool of async Ray actors.

Usage::

    import flowbatch as fb

    embed = fb.stage(
        Embedder(),  # its setup() runs once in each actor
        executor=fb.ray.actors(num_cpus=1, num_gpus=1),
        concurrency=4,  # calls in flight: one per actor
        batch=fb.Batch(max_size=64),
    )

The pipeline keeps running in one process (a script, ``flowbatch serve``,
``flowbatch worker``); only this stage's calls go to the cluster. Batching,
retries, deadlines, ordering, per-item errors and bisection stay in the
runner, as for a local stage: each actor takes one whole call at a time.

- ``ray.init`` is the caller's (``address="auto"``, ``ray://...``); when Ray
  is not initialised, opening the pipeline starts a local instance and logs it.
- Replicas: ``concurrency`` actors, or, when ``max_replicas`` is given, from
  ``min_replicas`` up to ``max_replicas`` (at most ``concurrency``), grown
  while calls wait for a free actor and shrunk after an actor sat idle.
  ``resize(n)`` sets the count by hand. ``concurrency=fb.Adaptive(min, max)``
  lets the runner's replica rule (flowbatch.replicas) size the pool instead;
  with ``min_replicas``/``max_replicas`` as well, opening fails: one pool,
  one rule.
- An actor that dies fails only the call it held (``WorkerCrashed``, retried
  as the stage's ``Retry`` says) and is replaced. An actor the cluster cannot
  place yet is counted in ``stats()`` (``pending``) and logged, not waited
  for in silence.
- Values between two consecutive Ray stages stay in Ray's object store: when
  the next stage also runs on ``fb.ray.actors``, this stage's results are left
  there and the runner carries ``ray.ObjectRef`` values, which the next
  stage's actor resolves itself, so large values never pass through the
  pipeline's process. Results for the last stage's caller, or for a local
  stage, come back as values. (The runner tells each executor which one
  follows it: :meth:`~flowbatch.Executor.followed_by`.) A ``fan_out`` stage
  always sends values (the runner must see its children). ``pass_refs``
  overrides the choice: ``True`` hands references to whatever follows (a
  local stage or the caller then gets ``ObjectRef`` values to ``ray.get``),
  ``False`` always brings values back; ``None`` (the default) is the
  automatic rule.

This module imports the real ``ray`` package (absolute imports): install it
with ``pip install 'flowbatch[ray]'``. (Over 500 lines on purpose: the actor
class, the pool that places, replaces and resizes actors, and the scaling rule
share one actor lifecycle; split apart, each would need the others' state.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray import cloudpickle
from ray.exceptions import RayActorError

from .errors import PipelineError, WorkerCrashed
from .executors import (
    CallTimedOut,
    Executor,
    _no_coroutine,
    _portable,
    _portable_items,
    materialize,
    materialize_each,
)

if TYPE_CHECKING:
    from .stage import Stage

__all__ = ["ActorInfo", "RayActors", "Scaling", "actors", "scale_step"]

log = logging.getLogger("flowbatch.ray")

#: Seconds an actor may go unplaced before it is reported as pending.
DEFAULT_PENDING_AFTER = 10.0


# ------------------------------------------------------------------ scaling


@dataclass(frozen=True, slots=True)
class Scaling:
    """The built-in replica rule: when to add or remove an actor.

    Add one while calls have waited for a free actor for ``up_after``
    seconds (the stage is the bottleneck and has a backlog); remove one
    after an actor has been idle for ``down_after`` seconds. ``tick`` is how
    often the rule is checked.

    Usage: ``fb.ray.actors(min_replicas=1, max_replicas=8,
    scaling=fb.ray.Scaling(up_after=2, down_after=60))``.
    """

    up_after: float = 2.0
    down_after: float = 60.0
    tick: float = 0.5

    def __post_init__(self) -> None:
        for name in ("up_after", "down_after", "tick"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Scaling.{name} must be a number > 0, got {value!r}")


def scale_step(
    *,
    replicas: int,
    lo: int,
    hi: int,
    waiting_for: float | None,
    idle_for: float | None,
    rule: Scaling,
) -> int:
    """The built-in rule as a pure function: +1, -1 or 0 replicas.

    ``waiting_for``: seconds calls have waited for a free actor without a
    break (None: none waits); ``idle_for``: seconds the longest-idle actor
    has had no call (None: every actor is busy).
    """
    if replicas < lo:
        return 1
    if replicas > hi:
        return -1
    if waiting_for is not None and waiting_for >= rule.up_after and replicas < hi:
        return 1
    if waiting_for is None and idle_for is not None and idle_for >= rule.down_after:
        return -1 if replicas > lo else 0
    return 0


# ------------------------------------------------------------- the actor


async def _resolve_refs(arg: Any) -> Any:
    """``arg`` with ``ObjectRef`` values (one, or in a batch's list) fetched here."""
    if isinstance(arg, ray.ObjectRef):
        return await arg
    if isinstance(arg, list) and any(isinstance(x, ray.ObjectRef) for x in arg):
        refs = [(i, x) for i, x in enumerate(arg) if isinstance(x, ray.ObjectRef)]
        values = await asyncio.gather(*(x for _, x in refs))
        out = list(arg)
        for (i, _), v in zip(refs, values, strict=True):
            out[i] = v
        return out
    return arg


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


class _Replica:
    """The body of one actor: the stage's function, set up once.

    A plain function runs in one dedicated thread (the one its ``setup()``
    ran in, so thread-bound state such as a CUDA context stays valid); an
    ``async def`` runs on the actor's event loop.
    """

    def __init__(self, fn: Any, post: Callable[[Any], Any] | None) -> None:
        self.fn = fn
        self.post = post
        self.is_async = _is_async(fn)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="flowbatch-ray")

    async def hello(self) -> tuple[int, str]:
        return os.getpid(), ray.get_runtime_context().get_node_id()

    async def watch(self) -> None:
        """Never answers: the driver learns of this actor's death through it."""
        await asyncio.Event().wait()

    async def _sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def setup(self) -> tuple[bool, Any]:
        setup = getattr(self.fn, "setup", None)
        if not callable(setup):
            return True, None
        try:
            r = await self._sync(setup)
            if inspect.isawaitable(r):
                await r
        except Exception as exc:
            return False, _portable(exc, cloudpickle.dumps)
        return True, None

    async def teardown(self) -> None:
        teardown = getattr(self.fn, "teardown", None)
        if callable(teardown):
            r = await self._sync(teardown)
            if inspect.isawaitable(r):
                await r

    async def _apply(self, arg: Any) -> Any:
        arg = await _resolve_refs(arg)
        if self.is_async:
            out = await self.fn(arg)
        else:
            out = _no_coroutine(await self._sync(self.fn, arg))
        if self.post is not None:
            out = self.post(out)
        return out

    async def run(self, arg: Any) -> tuple[bool, Any]:
        try:
            out = await self._apply(arg)
        except Exception as exc:
            return False, _portable(exc, cloudpickle.dumps)
        return True, _portable_items(out, cloudpickle.dumps)

    async def run_refs(self, arg: Any, n: int | None) -> tuple[Any, ...]:
        """Like ``run``, but each result is its own return value (object).

        The first return value is a small manifest for the driver: the
        error, the errors per item, or a broken batch's result (which the
        runner reports); the values stay in the object store.
        """
        count = 1 if n is None else n
        blank = (None,) * count
        try:
            out = await self._apply(arg)
        except Exception as exc:
            return ("error", _portable(exc, cloudpickle.dumps)), *blank
        if n is None:
            return ("ok", None), out
        if not isinstance(out, list | tuple) or len(out) != n:
            return ("broken", out), *blank
        errors = [_portable(x, cloudpickle.dumps) if isinstance(x, BaseException) else None for x in out]
        values = tuple(None if isinstance(x, BaseException) else x for x in out)
        return ("ok", errors), *values


# ------------------------------------------------------------ the driver


@dataclass(frozen=True, slots=True)
class ActorInfo:
    """One actor of a pool, as :meth:`RayActors.actors` lists it.

    ``handle`` is its Ray actor handle (``ray.kill(info.handle)`` stops it);
    ``pid`` and ``node_id`` are None until the cluster has placed it.
    """

    handle: Any
    pid: int | None
    node_id: str | None
    ready: bool
    busy: bool


class _Handle:
    __slots__ = (
        "actor", "busy", "dead", "idle_since", "n", "node", "pid", "placed", "ready", "reported",
    )

    def __init__(self, actor: Any, n: int) -> None:
        self.actor = actor
        self.n = n
        self.placed = False  # its process answered
        self.ready = False  # its setup() succeeded
        self.dead = False
        self.busy = False
        self.pid: int | None = None
        self.node: str | None = None
        self.reported = False  # logged as pending
        self.idle_since = time.monotonic()


def _request(num_cpus: float, num_gpus: float, resources: Mapping[str, float] | None) -> dict[str, float]:
    want = {"CPU": float(num_cpus), "GPU": float(num_gpus), **(resources or {})}
    return {k: v for k, v in want.items() if v}


def _placeable(want: Mapping[str, float]) -> bool:
    """Whether some live node of the cluster has (in total) what an actor asks."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return True  # cannot tell (a client connection): assume it can
    return any(
        all(node.get("Resources", {}).get(k, 0.0) >= v for k, v in want.items())
        for node in nodes
    )


class RayActors(Executor):
    """A pool of async Ray actors running one stage; see :func:`actors`."""

    def __init__(
        self,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        min_replicas: int = 1,
        max_replicas: int | None = None,
        pass_refs: bool | None = None,
        scaling: Scaling | None = None,
        pending_after: float = DEFAULT_PENDING_AFTER,
    ) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(min_replicas, int) or min_replicas < 1:
            raise ValueError(f"min_replicas must be an int >= 1, got {min_replicas!r}")
        if max_replicas is not None and (
            not isinstance(max_replicas, int) or max_replicas < min_replicas
        ):
            raise ValueError(
                f"max_replicas must be an int >= min_replicas ({min_replicas}), "
                f"got {max_replicas!r}"
            )
        if pending_after <= 0:
            raise ValueError(f"pending_after must be > 0, got {pending_after!r}")
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        if pass_refs is not None and not isinstance(pass_refs, bool):
            raise ValueError(f"pass_refs must be True, False or None, got {pass_refs!r}")
        self.pass_refs = pass_refs
        # Set by the runner at open (followed_by): the next stage runs on Ray too.
        self._next_on_ray = False
        self.scaling = scaling if scaling is not None else Scaling()
        self.pending_after = pending_after
        self.stage = "?"
        self._want = _request(num_cpus, num_gpus, resources)
        self._reset()

    def _reset(self) -> None:
        """Fresh state for one run: an instance may be opened again after it stopped
        (``pipe.run`` twice), each time on a new event loop."""
        self.restarts = 0
        self.pending = 0
        self._batched = False
        self._refs = False  # this run's results stay in the object store
        self._target = 0
        self._hi = 0
        self._handles: list[_Handle] = []
        self._idle: asyncio.LifoQueue[_Handle] = asyncio.LifoQueue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self._broken: BaseException | None = None
        self._waiting = 0
        self._waiting_since: float | None = None
        self._ids = itertools.count()
        self._cls: Any = None
        self._fn_ref: Any = None
        self._post: Callable[[Any], Any] | None = None

    # ----------------------------------------------------------- figures

    @property
    def replicas(self) -> int:
        """Actors alive or starting (the pool's size now)."""
        return sum(1 for h in self._handles if not h.dead)

    @property
    def ready(self) -> int:
        """Actors set up and taking calls."""
        return sum(1 for h in self._handles if h.ready and not h.dead)

    def actors(self) -> list[ActorInfo]:
        """The pool's live actors (placed or not), for inspection."""
        return [
            ActorInfo(h.actor, h.pid, h.node, h.ready, h.busy) for h in self._handles if not h.dead
        ]

    def __repr__(self) -> str:
        return (
            f"<RayActors stage={self.stage!r} replicas={self.replicas} ready={self.ready} "
            f"pending={self.pending} restarts={self.restarts}>"
        )

    # ---------------------------------------------------------- lifetime

    def followed_by(self, executor: Executor | None) -> None:
        """The runner's hook at open: results stay in the object store (as
        ``ObjectRef`` values the runner carries) when the next stage is on Ray
        actors too, unless ``pass_refs`` says otherwise."""
        self._next_on_ray = isinstance(executor, RayActors)

    async def start(self, stage: Stage) -> None:
        self._reset()
        self.stage = stage.name
        self._batched = stage.batch is not None
        if self.pass_refs is None:
            self._refs = self._next_on_ray and not stage.fan_out
        else:
            self._refs = self.pass_refs
        if self.pass_refs and stage.fan_out:
            raise PipelineError(
                f"stage {stage.name!r}: pass_refs=True does not apply to a fan_out stage "
                "(the runner must see its children)"
            )
        if stage.adaptive is not None and (
            self.max_replicas is not None or self.min_replicas != 1
        ):
            a = stage.adaptive
            raise PipelineError(
                f"stage {stage.name!r}: fb.ray.actors(min_replicas={self.min_replicas}, "
                f"max_replicas={self.max_replicas}) scales the actor pool by its own rule, "
                f"and concurrency=fb.Adaptive(min={a.min}, max={a.max}) would scale the same "
                "pool by the runner's; pick one: concurrency=fb.Adaptive(...) with "
                "fb.ray.actors() (no min_replicas/max_replicas), or a fixed "
                f"concurrency={a.max} with fb.ray.actors(max_replicas=...)"
            )
        hi = self.max_replicas if self.max_replicas is not None else stage.concurrency
        if hi > stage.concurrency:
            raise PipelineError(
                f"stage {stage.name!r}: max_replicas={hi} but concurrency="
                f"{stage.concurrency}; the runner sends at most concurrency calls at "
                f"once, so set concurrency={hi}"
            )
        if self.min_replicas > stage.concurrency:
            raise PipelineError(
                f"stage {stage.name!r}: min_replicas={self.min_replicas} is more than "
                f"concurrency={stage.concurrency}"
            )
        self._hi = hi
        self._target = self.min_replicas if self.max_replicas is not None else hi
        if not ray.is_initialized():
            # Starts a local instance unless RAY_ADDRESS (or a `ray start` on
            # this machine) names a cluster to join.
            ray.init(ignore_reinit_error=True)
            log.info(
                "flowbatch: Ray was not initialised; called ray.init() for stage %r: "
                "Ray at %s, %s CPUs (a local instance unless RAY_ADDRESS names a "
                "cluster). Call ray.init(address=...) first to choose the cluster.",
                stage.name,
                ray.get_runtime_context().gcs_address,
                ray.cluster_resources().get("CPU", 0),
            )
        if stage.fan_out:
            self._post = materialize_each if self._batched else materialize
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = self.resources
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        self._cls = ray.remote(_Replica).options(**options)
        try:
            self._fn_ref = ray.put(stage.fn)
        except Exception as exc:  # Ray raises TypeError with a long dump of the object
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(
                f"stage {stage.name!r} cannot be sent to Ray actors: {first} "
                "(the callable must be picklable; load models and open clients, locks "
                "or connections in setup(), which runs in each actor)"
            ) from exc
        for _ in range(self._target):
            self._spawn()
        try:
            await self._wait_started()
        except BaseException:
            await self.stop()
            raise
        if self.max_replicas is not None and self.max_replicas > self.min_replicas:
            self._own(self._autoscale())

    async def _wait_started(self) -> None:
        """Until every first actor is ready or known to be pending; raise a setup error."""
        while True:
            if self._broken is not None:
                raise _setup_failed(self.stage, self._broken)
            live = [h for h in self._handles if not h.dead]
            if all(h.ready or h.reported for h in live):
                return
            self._changed.clear()
            await self._changed.wait()

    def _spawn(self) -> _Handle:
        self._handles = [h for h in self._handles if not h.dead]
        h = _Handle(self._cls.remote(self._fn_ref, self._post), next(self._ids))
        self._handles.append(h)
        self._own(self._bring_up(h))
        return h

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _note(self) -> None:
        """An actor changed state: recount the pending ones, wake ``start``."""
        self.pending = sum(1 for h in self._handles if not h.placed and not h.dead)
        self._changed.set()

    async def _bring_up(self, h: _Handle) -> None:
        """Place actor ``h`` (reporting it while it waits), run its setup(), watch it."""
        try:
            hello = asyncio.wrap_future(h.actor.hello.remote().future())
            if not _placeable(self._want):
                self._report_pending(h, "no node of the cluster has that much")
            try:
                await asyncio.wait_for(asyncio.shield(hello), self.pending_after)
            except TimeoutError:
                self._report_pending(h, f"not placed after {self.pending_after:g}s")
                await hello
            h.pid, h.node = hello.result()
            h.placed = True
            if h.reported:
                log.info("flowbatch: a Ray actor of stage %r was placed", self.stage)
            self._note()
            ok, err = await h.actor.setup.remote()
        except RayActorError as exc:
            h.dead = True
            self._note()
            if not self._closing:
                self._broken = exc
                log.warning(
                    "flowbatch: a Ray actor of stage %r failed to start: %s", self.stage, exc
                )
                self._idle.put_nowait(h)  # wakes a waiting caller, who sees _broken
            return
        if not ok:
            h.dead = True
            self._broken = err
            self._note()
            with contextlib.suppress(Exception):
                ray.kill(h.actor)
            self._idle.put_nowait(h)  # wakes a waiting caller, who sees _broken
            return
        h.ready = True
        h.idle_since = time.monotonic()
        self._broken = None
        self._idle.put_nowait(h)
        self._note()
        self._own(self._watch(h))

    def _report_pending(self, h: _Handle, why: str) -> None:
        if h.reported:
            return
        h.reported = True
        try:
            free = {k: v for k, v in ray.available_resources().items() if "node:" not in k}
        except Exception:
            free = {}
        log.warning(
            "flowbatch: a Ray actor of stage %r is pending: it asks %s and %s "
            "(free now: %s); calls wait for the actors that are up",
            self.stage,
            self._want,
            why,
            free,
        )
        self._note()

    async def _watch(self, h: _Handle) -> None:
        """Learn of ``h``'s death as it happens, even while it is idle."""
        try:
            await h.actor.watch.remote()
        except RayActorError as exc:
            self._died(h, exc)

    def _died(self, h: _Handle, cause: BaseException | None) -> None:
        if h.dead:
            return
        h.dead = True
        self._note()
        if self._closing:
            return
        self.restarts += 1
        log.warning(
            "flowbatch: a Ray actor of stage %r died (%s); starting a replacement",
            self.stage,
            type(cause).__name__ if cause is not None else "killed",
        )
        if self.replicas < max(self._target, self.min_replicas):
            self._spawn()

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [h for h in self._handles if h.ready and not h.dead]
        if live:
            refs = [h.actor.teardown.remote() for h in live]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), 30)
        for h in self._handles:
            if not h.dead:
                h.dead = True
                with contextlib.suppress(Exception):
                    ray.kill(h.actor)
        self._handles = []

    # ----------------------------------------------------------- scaling

    def resize(self, n: int) -> None:
        """Run ``n`` actors (within ``[min_replicas, max_replicas]``)."""
        if not isinstance(n, int) or not self.min_replicas <= n <= self._hi:
            raise ValueError(
                f"stage {self.stage!r}: resize({n!r}) is outside "
                f"[min_replicas={self.min_replicas}, max_replicas={self._hi}]"
            )
        self._target = n
        log.info("flowbatch: stage %r runs %d Ray actors", self.stage, n)
        while self.replicas < n:
            self._spawn()
        self._shed()

    def _shed(self) -> None:
        """Stop idle actors beyond the target (busy ones stop when they come free)."""
        keep: list[_Handle] = []
        while self.replicas > self._target and not self._idle.empty():
            h = self._idle.get_nowait()
            if h.dead:
                continue
            if self.replicas - len(keep) <= self._target:
                keep.append(h)
                continue
            self._retire(h)
        for h in reversed(keep):
            self._idle.put_nowait(h)

    def _retire(self, h: _Handle) -> None:
        h.dead = True
        self._note()

        async def down() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.actor.teardown.remote(), 30)
            with contextlib.suppress(Exception):
                ray.kill(h.actor)

        self._own(down())

    async def _autoscale(self) -> None:
        rule = self.scaling
        while True:
            await asyncio.sleep(rule.tick)
            now = time.monotonic()
            waiting_for = now - self._waiting_since if self._waiting_since is not None else None
            idle = [
                now - h.idle_since for h in self._handles if h.ready and not h.dead and not h.busy
            ]
            idle_for = max(idle) if idle else None
            step = scale_step(
                replicas=self._target,
                lo=self.min_replicas,
                hi=self._hi,
                waiting_for=waiting_for,
                idle_for=idle_for,
                rule=rule,
            )
            if step:
                self.resize(self._target + step)
                if step > 0 and self._waiting:
                    self._waiting_since = now  # give the new actor time to come up

    # ------------------------------------------------------------- calls

    async def _take(self) -> _Handle:
        self._waiting += 1
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        try:
            while True:
                h = await self._idle.get()
                if self._broken is not None and not h.ready:
                    self._idle.put_nowait(h)
                    raise WorkerCrashed(
                        f"stage {self.stage!r} has no Ray actor: one failed to start: "
                        f"{self._broken!r}"
                    ) from self._broken
                if not h.dead:
                    h.busy = True
                    return h
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._waiting_since = None

    def _release(self, h: _Handle) -> None:
        h.busy = False
        if h.dead:
            return
        h.idle_since = time.monotonic()
        if self.replicas > self._target:
            self._retire(h)
        else:
            self._idle.put_nowait(h)

    async def call(self, arg: Any, timeout: float | None, carrier: Any = None) -> Any:
        h = await self._take()
        try:
            coro = self._call_refs(h, arg) if self._refs else self._call(h, arg)
            if timeout is None:
                return await coro
            try:
                async with asyncio.timeout(timeout):
                    return await coro
            except TimeoutError as exc:
                # The actor is stuck in the call: stop it; a replacement starts.
                with contextlib.suppress(Exception):
                    ray.kill(h.actor)
                self._died(h, exc)
                raise CallTimedOut(
                    f"stage {self.stage!r} call took longer than {timeout}s; "
                    "its Ray actor was killed and replaced"
                ) from exc
        except RayActorError as exc:
            self._died(h, exc)
            raise WorkerCrashed(
                f"a Ray actor of stage {self.stage!r} died while it held this item: "
                f"{type(exc).__name__}"
            ) from exc
        finally:
            self._release(h)

    async def _call(self, h: _Handle, arg: Any) -> Any:
        ok, value = await h.actor.run.remote(arg)
        if not ok:
            raise value
        return value

    async def _call_refs(self, h: _Handle, arg: Any) -> Any:
        n = len(arg) if self._batched else None
        refs = h.actor.run_refs.options(num_returns=1 + (n or 1)).remote(arg, n)
        kind, info = await refs[0]
        if kind == "error":
            raise info
        if kind == "broken":
            return info  # the runner reports the broken contract
        if n is None:
            return refs[1]
        return [err if err is not None else ref for err, ref in zip(info, refs[1:], strict=True)]


def _setup_failed(stage: str, exc: BaseException) -> PipelineError:
    err = PipelineError(
        f"stage {stage!r}: a Ray actor failed to start: setup() failed: "
        f"{type(exc).__name__}: {exc}"
    )
    err.__cause__ = exc
    return err


def actors(
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: Mapping[str, float] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    pass_refs: bool | None = None,
    scaling: Scaling | None = None,
    pending_after: float = DEFAULT_PENDING_AFTER,
) -> RayActors:
    """An executor that runs a stage on a pool of async Ray actors.

    ``num_cpus``, ``num_gpus``, ``resources`` and ``runtime_env`` are each
    actor's Ray options. The pool has ``concurrency`` actors (the stage's
    option: one call in flight per actor); with ``max_replicas`` it starts at
    ``min_replicas`` and follows the load up to ``max_replicas`` (which must
    not exceed ``concurrency``; see :class:`Scaling`). When the next stage
    also runs on Ray actors, results stay in the object store (the runner
    carries ``ObjectRef`` values; that stage resolves them in its actor);
    otherwise they come back as values. ``pass_refs=True`` keeps them in the
    store whatever follows (a local stage or the caller gets references),
    ``pass_refs=False`` never does; ``None`` is that automatic rule. An actor not
    placed within ``pending_after`` seconds is logged and counted as pending.

    Usage::

        fb.stage(Embedder(), executor=fb.ray.actors(num_gpus=1), concurrency=2,
                 batch=fb.Batch(max_size=64))
    """
    return RayActors(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        runtime_env=runtime_env,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        pass_refs=pass_refs,
        scaling=scaling,
        pending_after=pending_after,
    )
