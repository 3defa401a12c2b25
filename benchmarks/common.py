"""What every benchmark shares: the model to measure, threads, timing, the result table, random SD1.5-shaped
weights, and the app served in-process.

Every number the benchmarks print is a ratio or is printed next to what it is compared with
(docs/ARCHITECTURE.md, Measuring); absolute times depend on the machine and its load, so a benchmark never asserts one.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import io
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; a missing model fails fast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUILTIN_MODEL = REPO / "assets" / "models" / "shapes-ldm"
TRAINING_EXPORT = REPO / "runs" / "ldm" / "pipeline"  # the LDM trainer's latest export (until the model ships)
# Random-weight models are built once here and reused across runs (LDS_BENCH_CACHE moves it).
CACHE = Path(os.environ.get("LDS_BENCH_CACHE") or Path(tempfile.gettempdir()) / "lds-bench-cache")
PROMPT = "a red circle left of a blue square"
PROMPTS = ("a red circle left of a blue square", "a big yellow star on grass", "a green person waving on sand",
           "a blue square at night", "a pink heart in the top left corner", "a white triangle on snow",
           "a purple circle right of an orange star", "a yellow person jumping on grass")


# --- options -------------------------------------------------------------------------------------------------

@dataclass
class Options:
    model: str = str(BUILTIN_MODEL)  # --model: a diffusers folder or a preset name
    threads: int = 0  # --threads: torch intra-op threads (0: every core this process may use)
    quick: bool = False  # --quick: tiny sizes and counts, a smoke run (tests/test_benchmarks.py)
    repeats: int = 7  # --repeats: timed runs per measurement (the median is reported); warm-up runs excluded
    sd15: bool = True  # --no-sd15: skip the SD1.5-shaped random-weight model (memory, FLOPs)
    compile: bool = True  # --no-compile: skip torch.compile (minutes of compiling on a CPU); never in --quick
    soak_requests: int = 500  # --soak-requests: requests of the soak part (quick: 8)
    soak_age_s: int = 60  # --soak-age: the file age limit (LDS_MAX_FILE_AGE_S) of the soak's app (quick: 1 s)
    soak_steps: int = 20  # --soak-steps: denoising steps of each soak request (quick: 2)
    notes: list[str] = field(default_factory=list)  # printed under the table

    @property
    def steps(self) -> int:
        return 2 if self.quick else 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(BUILTIN_MODEL),
                        help="diffusers StableDiffusionPipeline folder or preset name; while assets/models/shapes-ldm "
                             "does not exist, a copy of the trainer's latest export runs/ldm/pipeline is used")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores this process may use)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: few steps, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 7, quick 1)")
    parser.add_argument("--no-sd15", dest="sd15", action="store_false",
                        help="skip the SD1.5-shaped random-weight model")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile measurement (it compiles for minutes on a CPU)")
    parser.add_argument("--soak-requests", type=int, default=500, help="requests of the soak part (part 6)")
    parser.add_argument("--soak-age", type=int, default=60,
                        help="the soak's file age limit in seconds (the app's LDS_MAX_FILE_AGE_S)")
    parser.add_argument("--soak-steps", type=int, default=20, help="denoising steps of each soak request")


def options_from(args: argparse.Namespace) -> Options:
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 7)
    return Options(model=args.model, threads=args.threads, quick=args.quick, repeats=max(1, repeats), sd15=args.sd15,
                   compile=args.compile and not args.quick, soak_requests=max(2, args.soak_requests),
                   soak_age_s=max(1, args.soak_age), soak_steps=max(1, args.soak_steps))


def parse_options(description: str, argv=None) -> Options:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    return options_from(parser.parse_args(argv))


def cores() -> int:
    from pipelines.compute import usable_cores

    return usable_cores()


def set_threads(opts: Options) -> int:
    import torch

    threads = opts.threads or cores()
    torch.set_num_threads(threads)
    return threads


# --- the model -----------------------------------------------------------------------------------------------

COPY_LIMIT = 2 * 1024**3  # model folders smaller than this are measured from a private copy
_copies: dict[str, tuple[str, str | None]] = {}  # source folder -> (private copy, note), one copy per run


def model_folder(opts: Options) -> tuple[str, str | None]:
    """(folder or preset to load, a note). A model folder is copied to a private temp folder first: weights are
    memory-mapped from their files, so a folder rewritten during the run (the built-in model while it is being
    trained or packaged) would change the model under a running benchmark. While the built-in folder does not
    exist, the trainer's latest export runs/ldm/pipeline is measured instead (and the table says so)."""
    path = Path(opts.model)
    if (path / "model_index.json").is_file():
        source, note = path, None
    elif path.resolve() == BUILTIN_MODEL.resolve() and (TRAINING_EXPORT / "model_index.json").is_file():
        source = TRAINING_EXPORT
        from training.common import folder_step

        step = folder_step(source)
        note = (f"{BUILTIN_MODEL.relative_to(REPO)} does not exist yet: measured a copy of the training export "
                f"runs/ldm/pipeline (training step {step})")
    else:
        return opts.model, None  # a preset name: loaded as the app would load it
    if sum(f.stat().st_size for f in source.rglob("*") if f.is_file()) > COPY_LIMIT:
        return str(source), note
    key = str(source.resolve())
    if key not in _copies:
        _copies[key] = (_private_copy(source), note)
    return _copies[key]


def _private_copy(source: Path) -> str:
    root = Path(tempfile.mkdtemp(prefix="lds-bench-model-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / source.name
    for _ in range(3):  # the folder may be being written right now: copy until a complete folder results
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        try:
            for sub in ("unet", "vae", "text_encoder"):
                json.loads((target / sub / "config.json").read_text())
            break
        except (OSError, ValueError):
            time.sleep(2)
    return str(target)


def preset_for(folder_or_name: str):
    """The app's own preset for the built-in model (defaults, schedulers), pointed at `folder_or_name`."""
    from pipelines.registry import resolve_preset

    path = Path(folder_or_name)
    if (path / "model_index.json").is_file():
        unet = json.loads((path / "unet" / "config.json").read_text())
        if int(unet.get("sample_size", 0)) <= 32:  # a Shapes-sized model: the built-in preset's settings
            if unet.get("time_cond_proj_dim"):  # distilled (LCM): the distilled preset's steps and scheduler
                return dataclasses.replace(resolve_preset("shapes-lcm"), base=str(path))
            shapes = resolve_preset("shapes")
            # the built-in inpainting U-Net belongs to the built-in base only (it was derived from its U-Net)
            # (model_folder measures a private copy of the built-in folder: the same files elsewhere)
            same_base = all(
                (path / name).is_file() and (path / name).read_bytes() == (Path(shapes.base) / name).read_bytes()
                for name in ("TRAINING_STEP", "unet/config.json"))
            return dataclasses.replace(
                shapes, base=str(path), inpaint_model=shapes.inpaint_model if same_base else None
            )
    return resolve_preset(folder_or_name)


@contextlib.contextmanager
def environment(**values: str):
    """These environment variables set for the block, each put back as it was (or removed) afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def empty_onnx_cache() -> str:
    """A private, empty ONNX export cache (LDS_ONNX_CACHE) removed at exit: exports are measured from cold."""
    cache = tempfile.mkdtemp(prefix="lds-bench-onnx-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    return cache


def build_engine(folder_or_name: str):
    from pipelines.engine import Engine

    return Engine(preset_for(folder_or_name), device="cpu")


# --- timing --------------------------------------------------------------------------------------------------

def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median time of each fn, run in turns (a, b, a, b, ...) so slow drifts of the machine hit both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 torch.mm throughput at the current thread count (the floor's yardstick)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


# --- the result table ----------------------------------------------------------------------------------------

@dataclass
class Row:
    part: str  # "1 app overhead", ...
    name: str  # what is compared
    value: float  # the ratio (or the number, when unit says so)
    unit: str = "x"  # "x" for ratios; "s", "GFLOP", "%", "MB" otherwise
    goal: str = ""  # e.g. "<= 1.03"
    detail: str = ""  # the two sides of the ratio, so a reader can check it

    @property
    def verdict(self) -> str:
        if not self.goal or self.value != self.value:  # no goal, or not measured (NaN)
            return ""
        op, target = self.goal.split()
        ok = self.value <= float(target) if op == "<=" else self.value >= float(target)
        return "ok" if ok else "MISSED"


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN: not measured in this run (the detail says why)
        return "-"
    if unit == "x":
        return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.4g} {unit}"


def print_table(rows: list[Row], notes: list[str], *, title: str, file=None) -> None:
    file = file or sys.stdout
    headers = ("part", "measurement", "value", "goal", "", "detail")
    cells = [(r.part, r.name, fmt(r.value, r.unit), r.goal, r.verdict, r.detail) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers[:-1])]
    print(f"\n{title}", file=file)
    line = " | ".join(h.ljust(w) for h, w in zip(headers[:-1], widths)) + " | detail"
    print(line, file=file)
    print("-" * len(line), file=file)
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c[:-1], widths)) + " | " + c[-1], file=file)
    for note in dict.fromkeys(notes):  # unique, in order
        print(f"note: {note}", file=file)
    file.flush()


def machine_line(threads: int) -> str:
    import platform

    import torch

    return (f"{platform.processor() or platform.machine()}, {cores()} core(s) usable, torch {torch.__version__} "
            f"with {threads} thread(s), load average {os.getloadavg()[0]:.2f}")


# --- the app, served in-process (as tests/conftest.py does) ---------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveApp:
    url: str
    blocks: Any
    engine: Any

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "Closing server running on port ..."
            self.blocks.close()


def start_app(engine, attempts: int = 3, **settings) -> LiveApp:
    import app as studio_app

    for attempt in range(attempts):
        values = dict(host="127.0.0.1", port=free_port())
        values.update(settings)
        app_settings = studio_app.AppSettings(**values)
        blocks = studio_app.build_app(engine, app_settings)
        try:
            studio_app.launch(blocks, engine, app_settings, prevent_thread_lock=True, quiet=True)
        except ValueError as error:  # gradio's "localhost is not accessible": its start-up probe timed out
            blocks.close()
            if attempt + 1 == attempts or "localhost" not in str(error):
                raise
            time.sleep(2)
            continue
        return LiveApp(url=f"http://{app_settings.host}:{app_settings.port}", blocks=blocks, engine=engine)
    raise AssertionError("unreachable")


def txt2img_args(engine, *, seed: int, prompt: str = PROMPT, steps: int = 20, size: int | None = None) -> dict:
    preset = engine.preset
    size = size or preset.default_size
    return dict(prompt=prompt, negative_prompt="", seed=seed, steps=steps, guidance=preset.default_guidance,
                scheduler=preset.default_scheduler, width=size, height=size, batch_size=1)


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "httpx", "gradio", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def standalone(part: str, run: Callable[[Options], list[Row]], argv=None) -> int:
    """`python -m benchmarks.<part>`: run one part and print its rows."""
    opts = parse_options(f"Latent Diffusion Studio benchmark: {part}", argv)
    quiet_libraries()
    threads = set_threads(opts)
    rows = run(opts)
    print_table(rows, opts.notes, title=f"{part} ({machine_line(threads)})")
    return 0
