"""demo.running.run_task: what a tab's event sends to the page while a run goes on, and when."""
from __future__ import annotations

import time

from PIL import Image

from demo import running
from demo.studio import Studio
from pipelines.common import GenerationResult


class _Engine:
    """What run_task reads from an engine besides calling the task."""

    @staticmethod
    def unknown_words(prompt: str) -> list[str]:
        return []


def _task(*, wait_s: float, steps: int, step_s: float):
    """A task that waits `wait_s` (as behind another user's run), then reports `steps` steps `step_s` apart."""

    def task(engine, *, prompt, cancel, on_step):
        time.sleep(wait_s)
        for step in range(1, steps + 1):
            time.sleep(step_s)
            on_step(step, steps, None)
        return GenerationResult(images=[Image.new("RGB", (8, 8), "red")], params={"seed": 1, "prompt": prompt})

    return task


def _updates(task) -> list[tuple[float, tuple]]:
    started = time.perf_counter()
    out = []
    for update in running.run_task(_Engine(), Studio(), "txt2img", task, {"prompt": "a red circle"}, request=None,
                                   progress=None):
        out.append((time.perf_counter() - started, update))
    return out


def _statuses(updates) -> list[str]:
    return [status for _, (_, _, _, status) in updates if isinstance(status, str)]


def test_a_run_shorter_than_the_quiet_start_sends_only_its_result():
    updates = _updates(_task(wait_s=0.0, steps=4, step_s=0.01))
    assert len(updates) == 1
    _, (first, gallery, params, status) = updates[0]
    assert gallery and status.startswith("Done") and params["seed"] == 1


def test_a_longer_run_reports_its_steps_after_the_quiet_start():
    updates = _updates(_task(wait_s=0.0, steps=8, step_s=0.08))
    statuses = _statuses(updates)
    assert any(s.startswith("Step ") for s in statuses) and statuses[-1].startswith("Done")
    assert all(t >= running.QUIET_START_S for t, _ in updates)
    assert "Waiting for the model…" not in statuses  # it was running, not waiting


def test_a_run_waiting_for_the_engine_says_so_then_counts_steps():
    updates = _updates(_task(wait_s=running.HEARTBEAT_S + 0.3, steps=3, step_s=0.2))
    statuses = _statuses(updates)
    assert statuses[0] == "Waiting for the model…" and statuses.count("Waiting for the model…") == 1
    assert any(s.startswith("Step ") for s in statuses) and statuses[-1].startswith("Done")
