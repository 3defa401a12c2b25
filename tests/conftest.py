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
        "shapes": preset_from_folder(
            tiny_paths["shapes"],
            name="tiny-shapes",
            controlnets=controls("shapes"),
            style_presets=shapes_styles,
            default_scheduler="DPM++ 2M",
        ),
        "sd": preset_from_folder(
            tiny_paths["sd"],
            name="tiny-sd",
            controlnets=controls("sd"),
            style_presets={"watercolor": "watercolor painting"},
        ),
        "sd_inpaint_unet": preset_from_folder(
            tiny_paths["sd"], name="tiny-sd-9ch", inpaint_model=str(tiny_paths["sd_inpaint"])
        ),
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


# --- the real app on a free port (API, browser, bad-input, concurrency, security tests) -------------------
# Added by the UI side: these build the whole Gradio app around one engine and serve it in-process.

import io  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

BUILTIN_MODEL = REPO / "assets" / "models" / "shapes-ldm"
TEST_OUTPUT = REPO / "test-output"  # screenshots and other artefacts a person may want to look at
APP_MAX_FILE_MB = 2  # the test server's upload limit (every test image is far smaller)
APP_QUEUE_SIZE = 16


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@_dataclass
class LiveApp:
    url: str
    app: object  # gr.Blocks
    engine: object
    settings: object

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)  # downloads outputs through the file route, as users do


@pytest.fixture(scope="session")
def app_engine(tiny_presets):
    """The built-in Shapes model when it is trained (LDS_TEST_MODEL=tiny forces the tiny random one)."""
    from pipelines.engine import Engine
    from pipelines.registry import resolve_preset

    use_builtin = (BUILTIN_MODEL / "model_index.json").is_file() and os.environ.get("LDS_TEST_MODEL") != "tiny"
    preset = resolve_preset("shapes") if use_builtin else tiny_presets["shapes"]
    return Engine(preset, device="cpu")


def start_app(engine, **settings_overrides) -> LiveApp:
    import app as studio_app

    values = dict(host="127.0.0.1", port=free_port(), queue_size=APP_QUEUE_SIZE, max_file_size_mb=APP_MAX_FILE_MB)
    values.update(settings_overrides)
    settings = studio_app.AppSettings(**values)
    blocks = studio_app.build_app(engine, settings)
    studio_app.launch(blocks, engine, settings, prevent_thread_lock=True, quiet=True)
    return LiveApp(url=f"http://{settings.host}:{settings.port}", app=blocks, engine=engine, settings=settings)


@pytest.fixture(scope="session")
def live_app(app_engine):
    """The whole app served on 127.0.0.1:<free port>, shared by the app-level tests."""
    server = start_app(app_engine)
    yield server
    server.app.close()


@pytest.fixture
def client(live_app):
    return live_app.client()


@pytest.fixture(scope="session")
def test_output() -> Path:
    TEST_OUTPUT.mkdir(exist_ok=True)
    return TEST_OUTPUT


# --- input images, good and bad ----------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data: a decompression bomb that costs
    nothing to make (any reader that trusts the header before checking it would allocate gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def scene_image(seed: int = 3, size: int = 64):
    """A Shapes-world scene as a PIL image (the inputs the built-in model knows)."""
    from PIL import Image

    from training import shapes

    image = Image.fromarray(shapes.sample(seed).image)
    return image if size == 64 else image.resize((size, size), Image.NEAREST)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """name -> file: a normal scene plus every awkward kind of upload the app must survive."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    scene = scene_image()
    paths: dict[str, Path] = {}

    def save(name, image, **kwargs):
        paths[name] = root / name
        image.save(paths[name], **kwargs)

    save("scene.png", scene)
    save("scene_256.png", scene.resize((256, 256), Image.NEAREST))
    wide = scene.resize((64, 32))  # stored on its side as 32x64; EXIF orientation 6 turns it back to 64x32
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", wide.transpose(Image.ROTATE_90), exif=exif.tobytes(), quality=95)
    rgba = scene.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(scene.size))
    save("rgba.png", rgba)
    palette = scene.convert("P", palette=Image.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=0)
    grey16 = np.asarray(scene.convert("L"), dtype=np.uint16) * 257
    save("16bit.png", Image.fromarray(grey16.astype(np.uint16), mode="I;16"))
    save("cmyk.jpg", scene.convert("CMYK"), quality=95)
    save("grayscale.png", scene.convert("L"))
    save("1x1.png", Image.new("RGB", (1, 1), "red"))
    save("513x777.png", scene.resize((513, 777)))
    paths["bomb.png"] = root / "bomb.png"
    paths["bomb.png"].write_bytes(_png_header_only(20000, 20000))  # 400 Mpx claimed in 80 bytes
    paths["too_big.png"] = root / "too_big.png"
    paths["too_big.png"].write_bytes(_png_header_only(5000, 5000))  # 25 Mpx: above LDS_MAX_IMAGE_PIXELS
    buffer = io.BytesIO()
    scene.resize((128, 128)).save(buffer, format="PNG")
    paths["truncated.png"] = root / "truncated.png"
    paths["truncated.png"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    paths["not_image.png"] = root / "not_image.png"
    paths["not_image.png"].write_text("this is a text file renamed to .png\n" * 20)
    save("mask_empty.png", Image.new("L", scene.size, 0))
    save("mask_full.png", Image.new("L", scene.size, 255))
    half = Image.new("L", scene.size, 0)
    half.paste(255, (32, 0, 64, 64))  # right half
    save("mask_right_half.png", half)
    save("mask_other_size.png", half.resize((40, 24), Image.NEAREST))
    for name in ("control_canny.png", "control_pose.png", "control_depth.png"):
        example = REPO / "assets" / "examples" / name
        if example.is_file():
            paths[name] = example
    return paths
