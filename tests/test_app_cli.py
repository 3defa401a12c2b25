"""`python app.py` as a user runs it: flags, a local model folder, localhost-only binding; and the UI
package's promise never to import torch or diffusers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO, free_port

PYTHON = sys.executable


def run(*args, timeout=120, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [PYTHON, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


def test_help_lists_every_flag():
    result = run("app.py", "--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--device",
        "--dtype",
        "--host",
        "--port",
        "--share",
        "--auth",
        "--max-batch",
        "--queue-size",
        "--threads",
        "--attention-slicing",
        "--vae-tiling",
        "--cpu-offload",
        "--adapter",
        "--download",
        "--share-without-auth",
        "--safety-checker",
        "--no-safety-checker",
    ):
        assert flag in result.stdout


def test_unknown_model_is_a_clear_error():
    result = run("app.py", "--model", "/no/such/model-folder")
    assert result.returncode == 2
    assert "/no/such/model-folder" in result.stderr and "preset" in result.stderr


def test_bad_flag_values_are_refused():
    assert run("app.py", "--max-batch", "0").returncode == 2
    assert run("app.py", "--auth", "nopassword", "--model", "/no/such").returncode != 0


def test_ui_package_never_imports_torch():
    code = (
        "import sys, demo, demo.common, demo.fields, demo.settings_box, demo.cancelling, demo.zerogpu, demo.studio, "
        "demo.outputs, demo.running, demo.header, demo.txt2img, demo.inpaint, demo.outpaint, demo.style, "
        "demo.controlnet, demo.explain, demo.finetune, app; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_serves_a_local_model_folder_on_localhost_only(tiny_paths):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LDS_MODEL": str(tiny_paths["shapes"]), "LDS_HOST": "",
           "LDS_PORT": str(port)}
    env.pop("LDS_HOST")
    process = subprocess.Popen([PYTHON, "app.py"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(process.stdout.read())
                time.sleep(0.5)
        assert "Latent Diffusion Studio" in body
        other = non_loopback_address()
        if other:
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{other}:{port}/", timeout=2)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_adapter_flag_loads_a_lora_through_the_fine_tune_tabs_loader(tiny_paths):
    import app

    assert app.parse_adapter("loras/style.safetensors=zqx") == ("loras/style.safetensors", "zqx")
    assert app.parse_adapter("latent-consistency/lcm-lora-sdv1-5") == ("latent-consistency/lcm-lora-sdv1-5", None)
    lora_file = tiny_paths["sd_lcm_lora"] / "pytorch_lora_weights.safetensors"
    engine = app.build_engine(
        str(tiny_paths["sd"]), device="cpu", adapters=[f"{lora_file}=sks", str(tiny_paths["sd_lcm_lora"])]
    )
    described = {a["name"]: a for a in engine.adapters.describe()}
    assert described["pytorch_lora_weights"]["token"] == "sks"
    assert described["tiny-lcm-lora"]["token"] is None  # a folder (as hub LoRAs come): every prompt while on
    assert engine.adapters.active_for("a sks dog") == ("pytorch_lora_weights", "tiny-lcm-lora")
