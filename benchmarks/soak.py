"""6. Soak: N text-to-image requests (4 images each) through the real app, `python app.py` in its own process
with a short file age limit, and what each request leaves behind: the server's memory (RSS) and the disk its
cache folder takes (files and folders, in allocated blocks), sampled after every request.

A user's session lasts a few dozen requests, so every SESSION_REQUESTS requests a new gradio_client session
takes over; the server keeps the state of the KEPT_SESSIONS most recent ones (LDS_MAX_SESSIONS), so that within
the run the sessions' state stops adding up as it does on a server that has seen its limit of visitors. Before
the age limit has passed nothing can have been removed, so the growth per request over those first requests is
what the disk would grow by for ever without cleanup. The figures that count are over the last half of the
requests, which all start after the first files came of age: no file outlives the age limit by more than the
sweeps allow (the cache holds a window of files whose size follows the request rate), and the memory stays flat.

    python -m benchmarks.soak [--model FOLDER] [--threads N] [--soak-requests 500] [--soak-age 60] [--quick]
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    BUILTIN_MODEL,
    PROMPTS,
    REPO,
    Options,
    Row,
    free_port,
    model_folder,
    preset_for,
    standalone,
)
from demo.cleanup import sweep_interval

PART = "6 soak"
BATCH = 4  # images per request, as a user asking for a few variants
SESSION_REQUESTS = 25  # requests per client session
KEPT_SESSIONS = 4  # LDS_MAX_SESSIONS of the soak's app: the sessions' state stops adding up within the run
MEMORY_GOAL = "<= 0.05"  # MB of RSS per request over the last half: flat, within allocator noise
# The cache is bounded when no file outlives the age limit by more than the sweeps allow (demo/cleanup.py: three
# sweep intervals of a quarter of the age each), plus the time between two samples.
START_TIMEOUT_S = 1800  # a loaded machine may take minutes to import and load the model


@dataclass
class Sample:
    seconds: float  # since the first request was sent
    rss_mb: float  # the server process's resident memory
    disk_mb: float  # blocks allocated under the cache folder (files and folders)
    files: int
    oldest_s: float  # age of the oldest file the requests left (the examples excluded)


def disk_usage(root: Path, before: set[str] = frozenset()) -> tuple[float, int, float]:
    """(MB allocated to everything under root, number of files, age in seconds of the oldest file not in
    `before`), as `du` counts: folders take blocks too."""
    blocks, files, oldest, now = 0, 0, 0.0, time.time()
    for folder, subfolders, names in os.walk(root):
        for name in names + subfolders:
            path = os.path.join(folder, name)
            try:
                stat = os.lstat(path)
            except FileNotFoundError:  # swept away meanwhile
                continue
            blocks += stat.st_blocks
            if name in names and path not in before:
                oldest = max(oldest, now - stat.st_mtime)
        files += len(names)
    return blocks * 512 / 1e6, files, oldest


def files_under(root: Path) -> set[str]:
    return {os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names}


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def start_server(model: str, cache: Path, age_s: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(cache), "LDS_MAX_FILE_AGE_S": str(age_s), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "GRADIO_ANALYTICS_ENABLED": "False", "LDS_MAX_SESSIONS": str(KEPT_SESSIONS)}
    command = [sys.executable, "app.py", "--model", model, "--port", str(port), "--queue-size", "8"]
    if threads:
        command += ["--threads", str(threads)]
    with open(cache.parent / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if server.poll() is not None:
            log_text = (cache.parent / "server.log").read_text()[-2000:]
            raise RuntimeError(f"app.py exited with {server.returncode}:\n{log_text}")
        try:
            if httpx.get(url + "/config", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S} s")


def soak(model: str, preset, *, requests: int, age_s: int, steps: int, threads: int) -> list[Sample]:
    from gradio_client import Client

    root = Path(tempfile.mkdtemp(prefix="lds-soak-"))
    cache = root / "cache"
    cache.mkdir()
    samples: list[Sample] = []
    server = None
    try:
        server, url = start_server(model, cache, age_s, threads)
        client = None
        started = None
        for i in range(requests):
            if i % SESSION_REQUESTS == 0:
                client = Client(url, verbose=False, download_files=False)
            args = dict(prompt=PROMPTS[i % len(PROMPTS)], negative_prompt="", seed=1000 + i, steps=steps,
                        guidance=preset.default_guidance, scheduler=preset.default_scheduler,
                        width=preset.default_size, height=preset.default_size, batch_size=BATCH)
            if started is None:
                before = files_under(cache)  # the examples gradio copied in at start-up: they stay
                disk, files, _ = disk_usage(cache)
                samples.append(Sample(0.0, rss_mb(server.pid), disk, files, 0.0))
                started = time.perf_counter()
            client.predict(**args, api_name="/txt2img")
            disk, files, oldest = disk_usage(cache, before)
            samples.append(Sample(time.perf_counter() - started, rss_mb(server.pid), disk, files, oldest))
            if (i + 1) % SESSION_REQUESTS == 0:
                last = samples[-1]
                print(f"[soak] {i + 1}/{requests} requests, {last.seconds:.0f} s: RSS {last.rss_mb:.1f} MB, "
                      f"cache {disk:.2f} MB in {files} files", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(root, ignore_errors=True)
    return samples


def run(opts: Options) -> list[Row]:
    requests, age_s, steps = (8, 1, opts.steps) if opts.quick else (opts.soak_requests, opts.soak_age_s,
                                                                      opts.soak_steps)
    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    preset = preset_for(folder)
    # the built-in model runs as the app's own preset; any other folder as `--model FOLDER` does
    model = "shapes" if Path(opts.model).resolve() == BUILTIN_MODEL.resolve() and not note else folder
    samples = soak(model, preset, requests=requests, age_s=age_s, steps=steps, threads=opts.threads)
    first, last = samples[0], samples[-1]
    mid = samples[len(samples) // 2]
    half = len(samples) - 1 - len(samples) // 2
    young = [s for s in samples if s.seconds < age_s]  # before any file could come of age
    unbounded = (young[-1].disk_mb - first.disk_mb) / max(1, len(young) - 1)
    peak = max(s.disk_mb for s in samples)
    disk_rate = (last.disk_mb - mid.disk_mb) / half
    # RSS moves in steps (the allocator takes and returns arenas; a request now and then peaks): compare the
    # medians of the two quarters of the last half rather than two single samples
    third, fourth = samples[len(samples) // 2: 3 * len(samples) // 4], samples[3 * len(samples) // 4:]
    rss_third, rss_fourth = (statistics.median(s.rss_mb for s in part) for part in (third, fourth))
    rss_rate = (rss_fourth - rss_third) / max(1, (len(third) + len(fourth)) / 2)
    window = f"requests {len(samples) // 2 + 1}-{requests}, {mid.seconds:.0f}-{last.seconds:.0f} s"
    if mid.seconds < 1.75 * age_s:
        opts.notes.append(f"soak: the last half began {mid.seconds:.0f} s in, before the first files could all have "
                          f"been swept ({1.75 * age_s:.0f} s): use more requests or a shorter --soak-age")
    rate = requests / last.seconds
    oldest = max(s.oldest_s for s in samples[len(samples) // 2:])
    gap = max(b.seconds - a.seconds for a, b in zip(samples, samples[1:]))
    bound = age_s + 3 * sweep_interval(age_s) + gap
    rows = [
        Row(PART, f"oldest file left by the requests, last half of {requests} (age limit {age_s} s)", oldest,
            unit="s", goal=f"<= {bound:.0f}",
            detail=f"{window}; the sweeps allow the age + 3 x {sweep_interval(age_s)} s, + {gap:.1f} s between "
                   f"samples"),
        Row(PART, f"disk growth per request, last half of {requests}", disk_rate, unit="MB",
            detail=f"{window}: cache {mid.disk_mb:.2f} -> {last.disk_mb:.2f} MB ({mid.files} -> {last.files} files); "
                   f"peak {peak:.2f} MB; {BATCH} images of {preset.default_size}x{preset.default_size}, {steps} steps "
                   f"per request, "
                   f"{rate:.2f} requests/s"),
        Row(PART, "disk growth per request before the age limit (what grows for ever without cleanup)", unbounded,
            unit="MB", detail=f"first {len(young) - 1} requests, {young[-1].seconds:.0f} s: "
                              f"{first.disk_mb:.2f} -> {young[-1].disk_mb:.2f} MB"),
        Row(PART, f"server RSS growth per request, last half of {requests}", rss_rate, unit="MB", goal=MEMORY_GOAL,
            detail=f"{window}: median {rss_third:.1f} MB (3rd quarter) -> {rss_fourth:.1f} MB (4th), peak "
                   f"{max(s.rss_mb for s in samples):.0f} MB; whole run {first.rss_mb:.0f} -> {last.rss_mb:.0f} MB "
                   f"(from start-up, before the first request); a new client session every "
                   f"{SESSION_REQUESTS} requests, {KEPT_SESSIONS} kept (LDS_MAX_SESSIONS)"),
    ]
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
