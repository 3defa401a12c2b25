"""The Space check (`python -m scripts.check_space`): its rules on made-up file sets, and the whole check on
this repository's own commit (marker `space`: a clean venv as a Space builds it, the app on this machine's
network address)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scripts import check_space
from tests.conftest import REPO

LFS_RULES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def checked(tmp_path, files: dict[str, bytes], attributes: str = LFS_RULES) -> list[tuple[bool, str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / ".gitattributes").write_text(attributes)
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    report = check_space.Report()
    check_space.check_limits(tmp_path, sorted([".gitattributes", *files]), report)
    return report.lines


def failures(lines) -> list[str]:
    return [what for ok, what in lines if not ok]


def test_weights_and_images_in_lfs_pass(tmp_path):
    lines = checked(tmp_path, {"assets/model.safetensors": b"\0" * (11 * check_space.MB), "a.png": b"\x89PNG\0",
                               "app.py": b"print('hi')\n"})
    assert failures(lines) == [] and len(lines) == 4


def test_a_big_file_outside_lfs_fails_and_is_named(tmp_path):
    lines = checked(tmp_path, {"data/big.txt": b"x" * (check_space.NON_LFS_MAX_BYTES + 1)})
    assert failures(lines) == ["no file outside LFS above 10 MB: data/big.txt (10.0 MB)"]


def test_a_binary_file_outside_lfs_fails_and_is_named(tmp_path):
    lines = checked(tmp_path, {"weights/model.ckpt": b"PK\0\0binary"})
    assert len(failures(lines)) == 1 and "weights/model.ckpt" in failures(lines)[0]
    lines = checked(tmp_path / "none", {"a.png": b"\x89PNG\0"}, attributes="")  # no .gitattributes rules at all
    assert "a.png" in failures(lines)[0]


def test_front_matter_is_read_as_spaces_read_it():
    config = check_space.front_matter(REPO / "README.md")
    assert config["sdk"] == "gradio" and config["app_file"] == "app.py" and config["sdk_version"]


@pytest.mark.space
@pytest.mark.slow
def test_the_repository_comes_up_as_a_space():
    result = subprocess.run([sys.executable, "-m", "scripts.check_space"], cwd=REPO, capture_output=True, text=True,
                            timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for step in ("clean venv: pip install gradio==", "`python app.py` with Spaces' variables answers at",
                 "/txt2img through gradio_client at http://"):
        assert any(line.startswith("PASS " + step) for line in result.stdout.splitlines()), (step, output[-3000:])
    assert "http://127." not in result.stdout  # called where a Space's proxy connects, not on loopback
