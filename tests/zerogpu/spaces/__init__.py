"""A test double of the `spaces` package on a ZeroGPU Space: `spaces.GPU` with ZeroGPU's process model.

What it shares with `spaces` 0.51 (spaces/zero/wrappers.py), the part an app can get wrong:
- every call runs in a child process made with multiprocessing's "fork", so only the calling thread exists in
  the child and nothing the child changes comes back. By default a fresh child per call; with
  ZEROGPU_DOUBLE_REUSE=1 an idle child of the same function runs the next call, as ZeroGPU reuses an idle
  worker (a child whose call raised is dropped, as spaces drops it);
- the arguments go to the child pickled, and each result, yielded value or exception comes back pickled;
  a gr.Error arrives as itself, any other exception as gr.Error("ZeroGPU worker error"-titled) naming its class;
- generator functions stream: each yielded value crosses as it comes; when the caller stops iterating (a
  cancelled gradio job) the child is told to stop at its next yield;
- `duration` (seconds, a timedelta or a callable taking the call's arguments) bounds the call: past it the
  child is killed and the call fails with "GPU task aborted", as when ZeroGPU takes its GPU back;
- progress updates (gradio's Queue.set_progress / log_message) made in the child are forwarded to the parent's
  queue, as spaces does.
What it does not do: CUDA (there is none here), quotas, scheduling.

Test knobs (environment, read at each call):
  ZEROGPU_DOUBLE_TIME_SCALE  multiplies every duration (the double runs models on CPU, not on an H200)
  ZEROGPU_DOUBLE_LOG         a file that gets one JSON line per call: task name, child pid, duration asked
  ZEROGPU_DOUBLE_REUSE       1: reuse idle children (see above)
"""
from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from datetime import timedelta

DEFAULT_DURATION_S = 60  # spaces' default when no duration is given
ABORTED = "GPU task aborted"


def GPU(task=None, *, duration=None, size=None, **_):
    """`@spaces.GPU`, `@spaces.GPU(duration=...)` or `spaces.GPU(fn, duration=...)`."""
    if task is None or not callable(task):
        return functools.partial(GPU, duration=duration if task is None else task, size=size)
    if inspect.iscoroutinefunction(task):
        raise NotImplementedError("spaces.GPU does not take coroutine functions")
    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def generator_handler(*args, **kwargs):
            yield from _call(task, duration, args, kwargs, generator=True)

        decorated = generator_handler
    else:
        @functools.wraps(task)
        def handler(*args, **kwargs):
            for value in _call(task, duration, args, kwargs, generator=False):
                return value

        decorated = handler
    decorated.zerogpu = None
    return decorated


def _seconds(duration, args, kwargs) -> float:
    value = duration(*args, **kwargs) if callable(duration) else duration
    if value is None:
        value = DEFAULT_DURATION_S
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _gradio_error(message: str, title: str = "ZeroGPU worker error"):
    import gradio as gr

    return gr.Error(message, title=title, print_exception=False)


class _Worker:
    """A forked child that runs calls of one task until its pipe closes."""

    def __init__(self, task, generator: bool):
        fork = multiprocessing.get_context("fork")
        self.conn, there = fork.Pipe()
        self.stop = fork.Event()
        self.process = fork.Process(target=_child, args=(task, there, self.stop, generator), daemon=True)
        self.process.start()
        there.close()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


_idle: dict[int, list[_Worker]] = {}  # id(task) -> idle workers kept for reuse (ZEROGPU_DOUBLE_REUSE=1)
_idle_lock = threading.Lock()


def _worker_for(task, generator: bool, reuse: bool) -> _Worker:
    """An idle worker of this task when reuse is on and one is alive (as spaces reuses an idle worker), else a
    fresh fork."""
    if reuse:
        with _idle_lock:
            pool = _idle.setdefault(id(task), [])
            while pool:
                worker = pool.pop()
                if worker.process.is_alive():
                    return worker
                worker.close()
    return _Worker(task, generator)


def _call(task, duration, args, kwargs, *, generator: bool):
    """Run `task` in a forked child; yield what it yields (or its one result); raise what it raised."""
    from gradio.context import LocalContext

    seconds = _seconds(duration, args, kwargs)
    limit = seconds * float(os.environ.get("ZEROGPU_DOUBLE_TIME_SCALE", "1"))
    reuse = os.environ.get("ZEROGPU_DOUBLE_REUSE") == "1"
    blocks = LocalContext.blocks.get(None)
    context = (LocalContext.event_id.get(None), LocalContext.in_event_listener.get(False),
               LocalContext.progress.get(None))
    worker = _worker_for(task, generator, reuse)
    worker.stop.clear()
    _log(task, worker.process.pid, seconds)
    here, child = worker.conn, worker.process
    try:
        _send(here, ((args, kwargs), _portable(context)), pickling_what="the arguments")
    except BaseException:
        worker.close()
        raise
    deadline = time.monotonic() + limit
    finished = succeeded = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                child.kill()
                raise _gradio_error(f"{ABORTED}: the call ran past its duration of {seconds:g} s")
            if not here.poll(min(remaining, 0.25)):
                if not child.is_alive() and not here.poll():
                    raise _gradio_error(ABORTED)
                continue
            try:
                kind, value = pickle.loads(here.recv_bytes())
            except EOFError:
                raise _gradio_error(ABORTED) from None
            if kind == "rpc":  # a progress update made in the child, for this process's queue
                method, rpc_args, rpc_kwargs = value
                if blocks is not None and getattr(blocks, "_queue", None) is not None:
                    getattr(blocks._queue, method)(*rpc_args, **rpc_kwargs)
                continue
            if kind == "error":  # spaces drops a worker whose call failed: the next call forks a new one
                finished = True
                raise value
            if kind in ("ok", "end"):
                finished = succeeded = True
                if kind == "ok":
                    yield value
                return
            try:
                yield value  # kind == "yield"
            except GeneratorExit:  # the caller stopped listening: the child stops at its next yield
                worker.stop.set()
                raise
    finally:
        if not finished:
            worker.stop.set()
            child.join(max(0.0, min(deadline - time.monotonic(), 30)))
        if succeeded and reuse:
            with _idle_lock:
                _idle.setdefault(id(task), []).append(worker)
        else:
            worker.close()


def _child(task, conn, stop, generator: bool) -> None:
    """The forked worker: for each call, receive the pickled arguments, run the task, send everything back
    pickled; until the parent closes the pipe."""
    from gradio.context import LocalContext

    _forward_queue_updates(conn)
    while True:
        try:
            (args, kwargs), (event_id, in_listener, progress) = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        try:
            LocalContext.event_id.set(event_id)
            LocalContext.in_event_listener.set(in_listener)
            LocalContext.progress.set(progress)
            if generator:
                values = task(*args, **kwargs)
                for value in values:
                    if stop.is_set():
                        values.close()
                        break
                    _send(conn, ("yield", value), pickling_what="a yielded value")
                _send(conn, ("end", None))
            else:
                _send(conn, ("ok", task(*args, **kwargs)), pickling_what="the result")
        except BaseException as error:  # whatever it is, the parent hears of it
            try:
                _send(conn, ("error", _portable_error(error)))
            except Exception:
                break
    conn.close()


def _portable_error(error: BaseException):
    import gradio as gr

    if isinstance(error, gr.Error):
        return error
    traceback.print_exception(type(error), error, error.__traceback__)
    return _gradio_error(type(error).__name__)


def _send(conn, item, *, pickling_what: str = "a value") -> None:
    """Pickle first, so that an unpicklable value is a clear error here, not a broken pipe there."""
    try:
        data = pickle.dumps(item)
    except Exception as error:
        raise pickle.PicklingError(f"ZeroGPU could not pickle {pickling_what}: {error}") from error
    conn.send_bytes(data)


def _portable(context):
    """gradio's progress tracker without the iterables it may hold (spaces drops them the same way)."""
    event_id, in_listener, progress = context
    if progress is not None and getattr(progress, "iterables", None):
        progress = type(progress)(track_tqdm=getattr(progress, "track_tqdm", False))
    return event_id, in_listener, progress


def _forward_queue_updates(conn) -> None:
    """In the child: gradio's Queue.set_progress / log_message send their arguments to the parent instead."""
    from gradio.helpers import TrackedIterable
    from gradio.queueing import Queue

    def forward(name):
        def method(self, *args, **kwargs):
            _send(conn, ("rpc", (name, args, kwargs)))

        return method

    for name in ("set_progress", "log_message"):
        setattr(Queue, name, forward(name))
    TrackedIterable.__reduce__ = _tracked_iterable_reduce


def _tracked_iterable_reduce(self):
    from gradio.helpers import TrackedIterable

    cls, base, state, *_ = super(TrackedIterable, self).__reduce__()
    return cls, base, {**state, "iterable": None, "_tqdm": None}


def _log(task, pid, seconds: float) -> None:
    path = os.environ.get("ZEROGPU_DOUBLE_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"task": getattr(task, "__name__", str(task)), "pid": pid, "parent": os.getpid(),
                                  "duration": seconds}) + "\n")
