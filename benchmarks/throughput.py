"""3. Throughput: 8 clients at once against one client asking the same requests one after another, through
the running app's /txt2img API (gradio_client, one session per client).

Each of the 8 clients sends R requests back to back (different prompts and seeds, the same size, steps,
guidance and scheduler), so the engine finds several requests waiting whenever it frees up and runs them as
one batched call (pipelines/batching.py). Ratio = sequential time / concurrent time for the same 8R requests.
The same is then measured with merging off (LDS_BATCH_REQUESTS=1), which is what concurrency alone gives.
Every concurrent image is compared with its sequential twin.

    python -m benchmarks.throughput [--model FOLDER] [--threads N] [--quick]
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.common import PROMPTS, Options, Row, build_engine, model_folder, standalone, start_app, txt2img_args

PART = "3 throughput"
GOAL = ">= 1.8"
CLIENTS = 8


def _requests(engine, count: int, steps: int) -> list[dict]:
    return [txt2img_args(engine, seed=100 + i, prompt=PROMPTS[i % len(PROMPTS)], steps=steps) for i in range(count)]


def _image(result) -> np.ndarray:
    from PIL import Image

    with Image.open(result[1][0]["image"]) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def _measure(engine, requests: list[dict], clients: int) -> tuple[float, float, list, list]:
    """(sequential seconds, concurrent seconds, sequential images, concurrent images) on a fresh app."""
    server = start_app(engine, queue_size=max(20, 2 * len(requests)))
    try:
        sessions = [server.client() for _ in range(clients)]
        for session in sessions:  # warm-up: every session once (connections, first-call costs)
            session.predict(**requests[0], api_name="/txt2img")
        started = time.perf_counter()
        alone = [sessions[0].predict(**r, api_name="/txt2img") for r in requests]
        sequential = time.perf_counter() - started

        per_client = [requests[k::clients] for k in range(clients)]

        def client_run(k: int) -> list:
            return [sessions[k].predict(**r, api_name="/txt2img") for r in per_client[k]]

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(client_run, range(clients)))
        concurrent = time.perf_counter() - started
        together: list = [None] * len(requests)
        for k, results in enumerate(outcomes):
            for j, result in enumerate(results):
                together[k + j * clients] = result
    finally:
        server.close()
    return sequential, concurrent, [_image(r) for r in alone], [_image(r) for r in together]


def run(opts: Options) -> list[Row]:
    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    clients = 2 if opts.quick else CLIENTS
    per_client = 1 if opts.quick else 3
    requests = _requests(engine, clients * per_client, opts.steps)
    rows = []
    for label, batch in (("batching on", engine.limits.batch_requests), ("batching off", 1)):
        engine.limits = dataclasses.replace(engine.limits, batch_requests=batch)
        sequential, concurrent, alone, together = _measure(engine, requests, clients)
        same = sum(np.array_equal(a, b) for a, b in zip(alone, together))
        worst = max(int(np.abs(a - b).max()) for a, b in zip(alone, together))
        rows.append(Row(
            PART, f"{clients} clients at once vs 1 client in turn ({label}, LDS_BATCH_REQUESTS={batch})",
            sequential / concurrent, goal=GOAL if batch > 1 else "",
            detail=f"{len(requests)} requests: {sequential:.2f} s in turn vs {concurrent:.2f} s at once; "
                   f"{same}/{len(requests)} images byte-identical to their solo run, max diff {worst}/255"))
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
