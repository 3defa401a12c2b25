"""One long-lived thread runs every model call of the process (`model_thread().run(fn, ...)`).

Why: PyTorch's CPU kernels run on OpenMP (GNU libgomp in the Linux wheels), and libgomp keeps one pool of
worker threads per OS thread that has ever run a parallel op. Between ops a pool's workers spin, waiting
for the next op, but only while the process's pools together hold no more threads than there are CPUs;
past that they go to sleep after ~100 spins and every op pays a futex wake-up (libgomp `do_spin`:
`gomp_managed_threads > gomp_available_cpus` -> `gomp_throttled_spin_count_var`). With N threads, a
second pool is enough to cross that line, and a request of a small model is thousands of small ops, each of
which would then wait for a wake-up. Loading and running the model on one thread keeps one pool in the
process, whatever thread a request arrives on (measurements: README, Performance). Other torch work on
another long-lived thread (a trainer, a benchmark's own calls) adds its pool again: run it here too.

The thread is shared by every engine of the process (a second pool would cost the same as before) and
created on first use, once per process: a forked child (ZeroGPU runs every `spaces.GPU` call in a process
forked from the app's) inherits only the thread that forked, so the parent's model thread does not exist
there and a job queued for it would wait forever. The first call in the child starts the child's own.
`run` called from the model thread itself runs inline, so nested calls cannot deadlock; a job must never
wait for a lock its caller holds (callers hold engine.lock; jobs do not take it). Thread-local torch state
does not cross: a job enters inference_mode itself, and the caller's torch thread count is applied on the
model thread before each job.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


class ModelThread:
    """A daemon thread that runs submitted calls one at a time and hands back their result or exception."""

    def __init__(self, name: str = "lds-model", *, adopt: bool = False):
        """adopt=True: the calling thread becomes the model thread; it runs its own calls inline and serves
        other threads' once it calls `serve_forever()` (see `adopt_current_thread`)."""
        self.pid = os.getpid()  # the process whose thread this is (a forked child has none running)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        if adopt:
            self._thread = threading.current_thread()
        else:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def serve_forever(self) -> None:
        """Run other threads' jobs on this adopted thread, for as long as the process lives."""
        if not self.on_thread():
            raise RuntimeError("serve_forever() must be called on the model thread itself")
        self._loop()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the model thread with the caller's torch thread count; blocks until it
        returns, re-raises what it raised."""
        return self.run_threads(torch.get_num_threads(), fn, *args, **kwargs)

    def run_threads(self, threads: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`run` with `threads` intra-op threads for this job (an engine's setting, whoever calls)."""
        if self.on_thread():
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs, threads)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if torch.get_num_threads() != job.threads:  # the caller's setting (torch keeps it per thread)
                    torch.set_num_threads(job.threads)
                job.result = job.fn(*job.args, **job.kwargs)
            except BaseException as error:  # handed to the caller, whatever it is; the thread lives on
                job.error = error
            finally:
                job.fn = job.args = job.kwargs = None  # hold no references between jobs
                job.done.set()
                del job


class EngineCompute:
    """An engine's handle on the model thread: every job runs with the engine's thread count.

    `thread` is the current process's model thread, looked up per call: an engine built in a parent
    process and used in a forked child runs its jobs on the child's thread."""

    def __init__(self, thread: ModelThread, threads: int):
        self._thread, self.threads = thread, threads

    @property
    def thread(self) -> ModelThread:
        if self._thread.pid != os.getpid():
            self._thread = model_thread()
        return self._thread

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return self.thread.run_threads(self.threads, fn, *args, **kwargs)

    def on_thread(self) -> bool:
        return self.thread.on_thread()

    @property
    def ident(self) -> int | None:
        return self.thread.ident


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(device: str) -> int:
    """Intra-op threads for model work: every usable core but one on CPU, torch's default elsewhere.

    The core left over serves the web layer. With every core in OpenMP, the server's own threads (queue,
    SSE, JSON, PNG encoding) preempt a worker now and then, and each of the thousands of small ops of a
    run waits for it at the barrier, which costs far more than the extra thread gains (measurements: README,
    Performance, and benchmarks part 1).
    """
    if device != "cpu":
        return torch.get_num_threads()
    return max(1, usable_cores() - 1)


def default_decode_threads(device: str) -> int:
    """Intra-op threads of the ONNX backend's VAE decode when the threads were not set: every usable core.

    A decode is a few large convolutions at the image's resolution, which split over cores where the U-Net's
    thousands of small ops do not, and the web layer has nothing to do while the last step of a run decodes
    (measurements: README, Fast backend).
    """
    return usable_cores() if device == "cpu" else default_threads(device)


class _Job:
    __slots__ = ("fn", "args", "kwargs", "threads", "result", "error", "done")

    def __init__(self, fn, args, kwargs, threads: int):
        self.fn, self.args, self.kwargs, self.threads = fn, args, kwargs, threads
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


def adopt_current_thread() -> ModelThread:
    """Make the calling thread this process's model thread (before any engine is built).

    For ZeroGPU: `spaces` emulates CUDA in the app's process with torch modes that exist only on the thread
    that imported it, so the model must be loaded, and adapters added, on that thread. The app builds its
    engine there and, once the server runs, hands the thread over with `model_thread().serve_forever()`."""
    global _shared
    with _shared_lock:
        if _shared is not None and _shared.pid == os.getpid() and not _shared.on_thread():
            raise RuntimeError("this process already has a model thread")
        _shared = ModelThread(adopt=True)
        return _shared


_shared: ModelThread | None = None
_shared_lock = threading.Lock()


def model_thread() -> ModelThread:
    """The process's model thread (started on first use in each process)."""
    global _shared, _shared_lock
    if _shared is not None and _shared.pid != os.getpid():
        # A forked child: the parent's thread is not here, and the lock may have been copied while another
        # parent thread held it. A child starts with one thread, which gets here before it starts any other.
        _shared, _shared_lock = None, threading.Lock()
    with _shared_lock:
        if _shared is None:
            _shared = ModelThread()
        return _shared
