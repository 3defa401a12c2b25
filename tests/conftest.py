"""Shared fixtures: tiny random models built once per session, and engines over them.

No model hub is reachable here: HF_HUB_OFFLINE is forced before huggingface_hub is imported, so a
missing hub model fails fast with the engine's ModelNotAvailable instead of waiting on the network.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # The machines running the tests are shared with training jobs; tiny models do not need more.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict:
    from tests.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_presets(tiny_paths) -> dict:
    """name -> ModelPreset: "shapes" and "sd" with ControlNets and styles, "sd_inpaint" (9-channel U-Net)."""
    from pipelines.registry import preset_from_folder

    def controls(name):
        return {t: str(tiny_paths[f"{name}_controlnet_{t}"]) for t in ("canny", "depth", "pose")}

    shapes_styles = {s: f"in {s} style" for s in ("flat", "outline", "striped", "dotted", "glow")}
    return {
        "shapes": preset_from_folder(tiny_paths["shapes"], name="tiny-shapes", controlnets=controls("shapes"),
                                     style_presets=shapes_styles, default_scheduler="DPM++ 2M"),
        "sd": preset_from_folder(tiny_paths["sd"], name="tiny-sd", controlnets=controls("sd"),
                                 style_presets={"watercolor": "watercolor painting"}),
        "sd_inpaint_unet": preset_from_folder(tiny_paths["sd"], name="tiny-sd-9ch", inpaint_model=str(tiny_paths["sd_inpaint"])),
        "sd_inpaint": preset_from_folder(tiny_paths["sd_inpaint"], name="tiny-sd-inpainting"),
    }


def _engine(preset):
    from pipelines.engine import Engine

    return Engine(preset, device="cpu")


@pytest.fixture(scope="session")
def shapes_engine(tiny_presets):
    return _engine(tiny_presets["shapes"])


@pytest.fixture(scope="session")
def sd_engine(tiny_presets):
    return _engine(tiny_presets["sd"])


@pytest.fixture(scope="session")
def sd_inpaint_engine(tiny_presets):
    return _engine(tiny_presets["sd_inpaint"])


@pytest.fixture
def replace_preset():
    return dataclasses.replace
