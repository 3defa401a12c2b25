"""A test double of the `spaces` package on a ZeroGPU Space: `spaces.GPU` with ZeroGPU's process model.

What it shares with `spaces` 0.51 (spaces/zero/wrappers.py), the part an app can get wrong:
- every call runs in a child process made with multiprocessing's "fork" (here a fresh one per call; ZeroGPU
  forks a worker and may reuse it while it stays idle), so only the calling thread exists in the child and
  nothing the child changes comes back;
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
"""
from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import pickle
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


def _call(task, duration, args, kwargs, *, generator: bool):
    """Run `task` in a forked child; yield what it yields (or its one result); raise what it raised."""
    from gradio.context import LocalContext

    seconds = _seconds(duration, args, kwargs)
    limit = seconds * float(os.environ.get("ZEROGPU_DOUBLE_TIME_SCALE", "1"))
    blocks = LocalContext.blocks.get(None)
    context = (LocalContext.event_id.get(None), LocalContext.in_event_listener.get(False),
               LocalContext.progress.get(None))
    fork = multiprocessing.get_context("fork")
    here, there = fork.Pipe()
    stop = fork.Event()
    child = fork.Process(target=_child, args=(task, there, stop, generator), daemon=True)
    child.start()
    there.close()
    _log(task, child.pid, seconds)
    try:
        _send(here, ((args, kwargs), _portable(context)), pickling_what="the arguments")
    except BaseException:
        child.kill()
        raise
    deadline = time.monotonic() + limit
    finished = False
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
                kind, value = here.recv()
            except EOFError:
                raise _gradio_error(ABORTED) from None
            if kind == "rpc":  # a progress update made in the child, for this process's queue
                method, rpc_args, rpc_kwargs = value
                if blocks is not None and getattr(blocks, "_queue", None) is not None:
                    getattr(blocks._queue, method)(*rpc_args, **rpc_kwargs)
                continue
            if kind == "error":
                finished = True
                raise value
            if kind in ("ok", "end"):
                finished = True
                if kind == "ok":
                    yield value
                return
            try:
                yield value  # kind == "yield"
            except GeneratorExit:  # the caller stopped listening: the child stops at its next yield
                stop.set()
                raise
    finally:
        if not finished:
            stop.set()
            child.join(max(0.0, min(deadline - time.monotonic(), 30)))
        if child.is_alive():
            child.kill()
        child.join(5)
        here.close()


def _child(task, conn, stop, generator: bool) -> None:
    """The forked worker: receive the pickled arguments, run the task, send everything back pickled."""
    from gradio.context import LocalContext

    _forward_queue_updates(conn)
    try:
        (args, kwargs), (event_id, in_listener, progress) = conn.recv()
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
            pass
    finally:
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
