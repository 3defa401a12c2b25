"""3. Throughput: 8 clients at once against one client asking the same requests one after another, through
the running app's /txt2img API (gradio_client, one session per client).

In each round, one client sends 16 requests one after another, then 8 clients send the same 16, two each,
back to back (different prompts and seeds; the same size, steps, guidance and scheduler), so the engine
finds requests waiting and runs them as one batched call (pipelines/batching.py). Rounds alternate the two
ways, so a machine whose speed drifts slows both alike. Ratio = total sequential time / total concurrent time.
The same is measured with merging off (LDS_BATCH_REQUESTS=1): what concurrency alone gives (it overlaps the
clients' HTTP waiting with model work). Every concurrent image is compared with its sequential twin.

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
PER_CLIENT = 2  # requests each client sends back to back in a round
ROUNDS = 2


def _requests(engine, count: int, steps: int, *, first_seed: int) -> list[dict]:
    return [txt2img_args(engine, seed=first_seed + i, prompt=PROMPTS[i % len(PROMPTS)], steps=steps)
            for i in range(count)]


def _image(result) -> np.ndarray:
    from PIL import Image

    with Image.open(result[1][0]["image"]) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def _measure(engine, rounds: list[list[dict]], clients: int) -> tuple[float, float, list, list]:
    """(sequential seconds, concurrent seconds, sequential images, concurrent images) on a fresh app."""
    server = start_app(engine, queue_size=max(20, 2 * clients))
    try:
        sessions = [server.client() for _ in range(clients)]
        for session in sessions:  # warm-up: every session once (connections, first-call costs)
            session.predict(**rounds[0][0], api_name="/txt2img")
        sequential = concurrent = 0.0
        alone, together = [], []
        with ThreadPoolExecutor(clients) as pool:
            for requests in rounds:
                started = time.perf_counter()
                alone += [sessions[0].predict(**r, api_name="/txt2img") for r in requests]
                sequential += time.perf_counter() - started
                started = time.perf_counter()
                per_client = list(pool.map(
                    lambda k, requests=requests: [
                        sessions[k].predict(**r, api_name="/txt2img") for r in requests[k::clients]
                    ],
                    range(clients)))
                concurrent += time.perf_counter() - started
                ordered: list = [None] * len(requests)
                for k, results in enumerate(per_client):
                    ordered[k::clients] = results
                together += ordered
    finally:
        server.close()
    return sequential, concurrent, [_image(r) for r in alone], [_image(r) for r in together]


def run(opts: Options) -> list[Row]:
    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    engine = build_engine(folder)
    clients, per_client, count_rounds = (2, 1, 1) if opts.quick else (CLIENTS, PER_CLIENT, ROUNDS)
    size = clients * per_client
    rounds = [_requests(engine, size, opts.steps, first_seed=100 + size * r) for r in range(count_rounds)]
    count = size * count_rounds
    rows = []
    # merging on at least for as many requests as there are clients, whatever LDS_BATCH_REQUESTS says
    for label, batch in (("batching on", max(engine.limits.batch_requests, clients)), ("batching off", 1)):
        engine.limits = dataclasses.replace(engine.limits, batch_requests=batch)
        sequential, concurrent, alone, together = _measure(engine, rounds, clients)
        same = sum(np.array_equal(a, b) for a, b in zip(alone, together))
        worst = max(int(np.abs(a - b).max()) for a, b in zip(alone, together))
        rows.append(Row(
            PART, f"{clients} clients at once vs 1 client in turn ({label}, LDS_BATCH_REQUESTS={batch})",
            sequential / concurrent, goal=GOAL if batch > 1 else "",
            detail=f"{count} requests in {len(rounds)} round(s): {sequential:.2f} s in turn vs {concurrent:.2f} s "
                   f"at once; {same}/{count} images byte-identical to their solo run, max diff {worst}/255"))
    return rows


if __name__ == "__main__":
    raise SystemExit(standalone(PART, run))
