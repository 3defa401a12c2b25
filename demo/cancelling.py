"""A real Cancel: per-(session, tab) flags in shared memory, seen by the app's process and by every ZeroGPU
worker forked from it (the Cancel button is wired by demo/outputs.wire_cancellable)."""
from __future__ import annotations

import hashlib
import multiprocessing

import gradio as gr

CANCEL_SLOTS = 512  # cancel flags held at once (requests waiting or running); the oldest waiting one gives way


class CancelRegistry:
    """Cancel flags keyed by (browser session, tab), shared by the app's process and every process forked from it.

    A browser click first *expects* a run, so that a Cancel while the request still waits in the queue is
    kept; the run then *starts* with that flag (a fresh one for API calls) and Cancel sets it. The app never
    uses gradio's own `cancels=`: its frontend keeps a cancelled event pending until two more round trips
    finish, and a Generate click in that window was silently dropped.

    The flags live in shared memory made when the app is built: on ZeroGPU a run starts and polls its flag in a
    worker process forked from the app's, while Cancel arrives in the app's own process; a flag in one
    process's memory would never reach the other. Each entry is (key id, state, cancelled, serial).
    """

    FREE, WAITING, RUNNING = 0, 1, 2
    _FIELDS = 4

    def __init__(self, slots: int = CANCEL_SLOTS) -> None:

        self._slots = slots
        self._table = multiprocessing.RawArray("q", slots * self._FIELDS)
        self._serial = multiprocessing.RawValue("q", 0)
        self._lock = multiprocessing.Lock()

    @staticmethod
    def _key_id(key: tuple[str, str]) -> int:
        digest = hashlib.blake2b("\0".join(key).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)

    def _entries(self, key_id: int, state: int) -> list[int]:
        t, n = self._table, self._FIELDS
        return [i for i in range(self._slots) if t[i * n + 1] == state and t[i * n] == key_id]

    def _claim(self, key_id: int, state: int) -> tuple[int, int]:
        """A free entry (else the oldest waiting one: a click whose request never ran) set to `state`."""
        t, n = self._table, self._FIELDS
        free = [i for i in range(self._slots) if t[i * n + 1] == self.FREE]
        if not free:
            waiting = [i for i in range(self._slots) if t[i * n + 1] == self.WAITING]
            if not waiting:
                raise RuntimeError(f"{self._slots} requests are running at once, the limit of the cancel registry")
            free = [min(waiting, key=lambda i: t[i * n + 3])]
        self._serial.value += 1
        i = free[0]
        t[i * n: i * n + n] = [key_id, state, 0, self._serial.value]
        return i, self._serial.value

    def expect(self, key: tuple[str, str]) -> None:
        key_id = self._key_id(key)
        with self._lock:
            for i in self._entries(key_id, self.WAITING):  # a new click replaces the last one's flag
                self._table[i * self._FIELDS + 1] = self.FREE
            self._claim(key_id, self.WAITING)

    def start(self, key: tuple[str, str]) -> CancelFlag:
        key_id, n = self._key_id(key), self._FIELDS
        with self._lock:
            waiting = self._entries(key_id, self.WAITING)
            if waiting:  # the click's flag, cancelled or not, becomes the run's
                i = waiting[0]
                self._table[i * n + 1] = self.RUNNING
                return CancelFlag(self, i, self._table[i * n + 3])
            return CancelFlag(self, *self._claim(key_id, self.RUNNING))

    def finish(self, key: tuple[str, str], flag: CancelFlag) -> None:
        with self._lock:
            if flag.current():
                self._table[flag.index * self._FIELDS + 1] = self.FREE

    def cancel(self, key: tuple[str, str]) -> str | None:
        """Set the flag of this key's run: "running", "waiting" (it will not run), or None (nothing to stop)."""
        key_id, n = self._key_id(key), self._FIELDS
        with self._lock:
            running = self._entries(key_id, self.RUNNING)
            if running:
                for i in self._entries(key_id, self.WAITING):  # a second click's leftover must not cancel the next run
                    self._table[i * n + 1] = self.FREE
                for i in running:
                    self._table[i * n + 2] = 1
                return "running"
            waiting = self._entries(key_id, self.WAITING)
            for i in waiting:
                self._table[i * n + 2] = 1
            return "waiting" if waiting else None


class CancelFlag:
    """One run's cancel flag (an entry of a CancelRegistry): `is_set()` / `set()`, readable from any process."""

    def __init__(self, registry: CancelRegistry, index: int, serial: int):
        self.registry, self.index, self.serial = registry, index, serial

    def current(self) -> bool:
        """The entry still belongs to this run (not finished and reused)."""
        return self.registry._table[self.index * CancelRegistry._FIELDS + 3] == self.serial

    def is_set(self) -> bool:
        # A run whose entry is finished (and perhaps reused) was abandoned: nobody waits for it, so it stops.
        return not self.current() or self.registry._table[self.index * CancelRegistry._FIELDS + 2] == 1

    def set(self) -> None:
        with self.registry._lock:
            if self.current():
                self.registry._table[self.index * CancelRegistry._FIELDS + 2] = 1


def session_key(request: gr.Request | None, tab: str) -> tuple[str, str]:
    session = getattr(request, "session_hash", None) or "anonymous"
    return (str(session), tab)
