"""Days of uptime: files older than `Limits.max_file_age_s` leave the disk (Gradio's delete_cache plus the app's
own sweep, demo/cleanup.py), and a session's history stays bounded. The soak benchmark (benchmarks/soak.py)
measures the growth per request over hundreds of requests."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from demo.cleanup import output_folder, sweep, sweep_interval
from tests.conftest import start_app

AGE_S = 2  # the test app's file age limit


def _tree(root: Path) -> tuple[set[str], set[str]]:
    """(files, folders) under root, as paths."""
    files, folders = set(), set()
    for folder, subfolders, names in os.walk(root):
        files.update(os.path.join(folder, n) for n in names)
        folders.update(os.path.join(folder, n) for n in subfolders)
    return files, folders


def test_age_limit_is_read_from_the_environment():
    from pipelines.settings import Limits

    assert Limits.from_env({}).max_file_age_s == 7200
    assert Limits.from_env({"LDS_MAX_FILE_AGE_S": "60"}).max_file_age_s == 60
    with pytest.raises(ValueError, match="LDS_MAX_FILE_AGE_S='0' must be positive"):
        Limits.from_env({"LDS_MAX_FILE_AGE_S": "0"})
    assert sweep_interval(2) == 1 and sweep_interval(60) == 15 and sweep_interval(7200) == 600
    assert Limits.from_env({}).max_sessions == 200
    assert Limits.from_env({"LDS_MAX_SESSIONS": "4"}).max_sessions == 4


def test_sweep_removes_old_files_and_empty_folders_only(tmp_path):
    now = time.time()
    example = tmp_path / "e" / "example.png"  # an example input: kept whatever its age
    example.parent.mkdir()
    example.write_bytes(b"e")
    os.utime(example, (now - 1000, now - 1000))
    old_file, new_file = tmp_path / "a" / "old.png", tmp_path / "b" / "new.png"
    empty_old, empty_new, kept = tmp_path / "c", tmp_path / "d", tmp_path / "keep"
    for folder in (old_file.parent, new_file.parent, empty_old, empty_new, kept):
        folder.mkdir()
    old_file.write_bytes(b"x")
    new_file.write_bytes(b"y")
    for path in (old_file, empty_old, kept):
        os.utime(path, (now - 100, now - 100))
    os.utime(old_file.parent, (now - 100, now - 100))

    keep = dict(keep_files={example}, keep_folders=(kept,))
    # folders only: no file goes, the old empty folder does (not the kept one, nor a young one)
    assert sweep(tmp_path, None, 50, now=now, **keep) == (0, 1)
    assert old_file.exists() and not empty_old.exists() and empty_new.exists() and kept.exists()
    # files too: the old file goes; its folder was just changed, so it waits for a later sweep
    assert sweep(tmp_path, 50, 50, now=now, **keep) == (1, 0)
    assert not old_file.exists() and new_file.exists() and old_file.parent.exists()
    assert sweep(tmp_path, 50, 50, now=time.time() + 60, **keep) == (1, 3)
    assert tmp_path.exists() and kept.exists() and example.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [example]


def test_history_is_bounded_and_drops_swept_files(tmp_path):
    from demo.outputs import HISTORY_LIMIT, _add_history

    paths = []
    for i in range(HISTORY_LIMIT + 5):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(b"png")
    history: list = []
    for path in paths:
        shown, history = _add_history([(str(path), "seed")], history)
    assert len(history) == HISTORY_LIMIT and history[0][0] == str(paths[-1])
    paths[-1].unlink()  # swept away
    shown, history = _add_history([], history)
    assert len(history) == HISTORY_LIMIT - 1 and str(paths[-1]) not in [item[0] for item in history]


@pytest.mark.slow
def test_real_app_removes_files_older_than_the_age_limit(tiny_presets, tmp_path, monkeypatch):
    """A real app with a 2 s age limit: every file and folder a request leaves in the cache (the result PNGs,
    previews, an upload) is gone within a few sweeps, the examples stay, and the app still serves requests."""
    from gradio_client import Client, handle_file

    from pipelines.engine import Engine

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # this app's cache alone (Blocks reads it when built)
    engine = Engine(tiny_presets["shapes"], device="cpu")
    engine.limits = dataclasses.replace(engine.limits, max_file_age_s=AGE_S, max_sessions=3)
    server = start_app(engine)
    try:
        assert Path(server.app.GRADIO_CACHE) == cache
        assert server.app.state_session_capacity == 3  # sessions' state kept (LDS_MAX_SESSIONS)
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "client"))  # not into the cache
        before_files, before_folders = _tree(cache)  # the examples, which stay (Gradio's keep_in_cache)
        args = dict(prompt="a red circle", negative_prompt="", seed=3, steps=4, guidance=2.5, scheduler="DPM++ 2M",
                    width=64, height=64, batch_size=2)
        client.predict(**args, api_name="/txt2img")
        png = next(output_folder(server.app).glob("*.png"))
        client.predict(png=handle_file(str(png)), api_name="/restore_params")  # an upload into the cache too
        files, folders = _tree(cache)
        files, folders = files - before_files, folders - before_folders
        pngs = [f for f in files if f.endswith(".png") and str(output_folder(server.app)) in f]
        assert len(pngs) == 2 and len(files) >= 3, files
        deadline = time.time() + 8 * AGE_S + 10
        while time.time() < deadline:
            left_files, left_folders = _tree(cache)
            if not (files & left_files) and not (folders & left_folders) - {str(output_folder(server.app))}:
                break
            time.sleep(0.5)
        left_files, left_folders = _tree(cache)
        assert not files & left_files, f"files older than {AGE_S} s still there: {sorted(files & left_files)}"
        assert not (folders & left_folders) - {str(output_folder(server.app))}, sorted(folders & left_folders)
        assert before_files <= left_files, "an example input was swept away"
        _, gallery, params, _ = client.predict(**args, api_name="/txt2img")  # still serving
        assert len(gallery) == 2 and params["seed"] == 3
    finally:
        server.app.close()


@pytest.mark.slow
def test_soak_benchmark_runs_the_real_app_and_reports_growth_per_request(tiny_paths, tmp_path):
    """`python -m benchmarks.soak --quick` (8 requests of 4 images through `python app.py`, a 1 s age limit)
    prints its four rows; the figures themselves come from a full run (README, Performance)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "LDS_BENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--quick", "--threads", "1",
                           "--model", str(tiny_paths["shapes"])], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("6 soak |")]
    assert len(rows) == 4, done.stdout
    assert "oldest file left by the requests, last half of 8 (age limit 1 s)" in rows[0]
    assert "disk growth per request, last half of 8" in rows[1]
    assert "before the age limit" in rows[2] and "server RSS growth per request" in rows[3]
    assert not list(tmp_path.glob("lds-soak-*")), "the soak's server folder was left behind"
