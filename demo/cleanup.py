"""Old files off the disk, so that days of uptime hold a bounded window of files.

Everything the app writes or receives lives in Gradio's cache folder: the result PNGs (in the app's own output
folder inside it, so Gradio serves them without a second copy), live previews, uploads, saved adapters. Two
sweeps keep it bounded, both driven by `Limits.max_file_age_s`:

- Gradio's own `delete_cache` (set on the Blocks by app.build_app) removes the files it tracks once they are
  older than the age, and forgets them, so its lists of files stay bounded too. In Gradio 6.31 that is the
  uploads; the files of this app's outputs (streamed by generator events) are not among them.
- `sweep` (run by `lifespan`, which app.launch hands to the server) removes the rest: files older than the age
  plus two sweep intervals (so Gradio's sweep, which also forgets a file, always comes first for those it
  tracks), never the app's example inputs (Gradio's keep_in_cache), and folders left empty (Gradio makes one
  per content hash and leaves it behind).

The cache folder must be the app's alone: `app.main` points GRADIO_TEMP_DIR at a folder of its own unless the
environment already names one (other Gradio apps on the machine keep theirs in the default, /tmp/gradio).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_SWEEP_INTERVAL_S = 600  # a file lives at most its age plus three of these
CACHE_FOLDER_NAME = "latent-diffusion-studio"


def own_cache_folder(env=os.environ) -> str:
    """GRADIO_TEMP_DIR when set, else a folder of this app's inside the system's temporary folder."""
    return env.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio" / CACHE_FOLDER_NAME)


def sweep_interval(age_s: int) -> int:
    """Seconds between sweeps: a quarter of the age, 1 s to 10 min."""
    return max(1, min(age_s // 4, MAX_SWEEP_INTERVAL_S))


def sweep(root: Path, file_age_s: float | None, folder_age_s: float, *, keep_files=frozenset(),
          keep_folders=(), now: float | None = None) -> tuple[int, int]:
    """Remove under `root` the files last changed more than `file_age_s` ago (none when None) except
    `keep_files`, and the empty folders last changed more than `folder_age_s` ago except `root` and
    `keep_folders`. Returns (files removed, folders removed).

    A folder's time is that of its last added or removed entry, so a folder emptied by this sweep goes in a
    later one, after a full age without use: a file being written into it now is never lost."""
    now = time.time() if now is None else now
    kept = {os.path.abspath(root), *(os.path.abspath(p) for p in keep_folders)}
    keep_files = {os.path.abspath(p) for p in keep_files}
    removed_files = removed_folders = 0
    for folder, _, names in os.walk(root, topdown=False):
        for name in names if file_age_s is not None else ():
            path = os.path.join(folder, name)
            try:
                if os.lstat(path).st_mtime < now - file_age_s and os.path.abspath(path) not in keep_files:
                    os.unlink(path)
                    removed_files += 1
            except FileNotFoundError:  # removed meanwhile (by Gradio's sweep)
                pass
        if os.path.abspath(folder) in kept:
            continue
        try:
            if os.lstat(folder).st_mtime < now - folder_age_s and not os.listdir(folder):
                os.rmdir(folder)
                removed_folders += 1
        except OSError:  # not empty after all, or already gone
            pass
    return removed_files, removed_folders


def examples_of(app) -> set[str]:
    """The files Gradio keeps for good (example inputs, default values), as its own sweep does."""
    return {path for block in app.blocks.values() for path in getattr(block, "keep_in_cache", ())}


def sweep_app_files(app, age_s: int) -> tuple[int, int]:
    """One sweep of the app's cache folder (see the module's docstring)."""
    return sweep(Path(app.GRADIO_CACHE), age_s + 2 * sweep_interval(age_s), age_s, keep_files=examples_of(app),
                 keep_folders=(output_folder(app),))


def output_folder(app) -> Path:
    """Where the app (`app`: the gr.Blocks) writes its result PNGs and saved adapters: a folder of this process
    inside Gradio's cache, which Gradio then serves as they are (a file outside the cache would be copied in)."""
    return Path(app.GRADIO_CACHE) / f"lds-outputs-{os.getpid()}"


def lifespan(app, age_s: int):
    """A server lifespan for `app` (Blocks.launch's `app_kwargs={"lifespan": ...}`) that sweeps every
    `sweep_interval` while the server runs, off the event loop."""
    every = sweep_interval(age_s)

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(sweep_app_files, app, age_s)
            except Exception:  # one failed sweep (a permission, a vanished folder) must not end the sweeping
                logger.exception("sweeping old files out of %s failed; trying again in %d s", app.GRADIO_CACHE, every)

    @contextlib.asynccontextmanager
    async def handler(_app):
        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return handler
