"""Latent Diffusion Studio: command line + assembly of the Gradio app. Nothing else lives here.

    python app.py                          # built-in Shapes model on http://127.0.0.1:7860
    python app.py --model sd15 --device cuda
    python app.py --download sd15          # fetch hub weights, then exit

Tabs live in demo/ (one file each), the model side in pipelines/. Importing this module builds
nothing: `build_app(engine, settings)` makes the Blocks, `launch(app, settings)` serves it.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
DEFAULT_HOST = "127.0.0.1"  # local only; --host 0.0.0.0 or --share expose it, on request
DEFAULT_PORT = 7860
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SHARE_WITHOUT_AUTH_FLAG = "--share-without-auth"
DEFAULT_QUEUE_SIZE = 20  # requests waiting for the model beyond this are refused politely
TITLE = "Latent Diffusion Studio"


@dataclass
class AppSettings:
    """How the web app is served (the model's own limits live in pipelines/settings.py)."""

    host: str = DEFAULT_HOST  # --host / LDS_HOST
    port: int = DEFAULT_PORT  # --port / LDS_PORT
    share: bool = False  # --share: a public *.gradio.live link
    auth: list[tuple[str, str]] = field(default_factory=list)  # --auth user:pass / LDS_AUTH
    queue_size: int = DEFAULT_QUEUE_SIZE  # --queue-size / LDS_QUEUE_SIZE
    max_file_size_mb: int | None = None  # None -> engine.limits.max_upload_mb


def parse_auth(value: str | None) -> list[tuple[str, str]]:
    """'user:pass' or 'u1:p1,u2:p2' -> [(user, pass), ...]."""
    pairs = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth {item!r}: expected user:password")
        pairs.append((user, password))
    return pairs


def server_address(env=os.environ) -> tuple[str, int]:
    """The default (host, port) when no --host/--port flag is given: LDS_HOST/LDS_PORT, else Gradio's own
    GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (how Spaces and Docker images tell an app where to listen), else
    127.0.0.1:7860. The flags override all of these."""
    host = env.get("LDS_HOST") or env.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port_name = "LDS_PORT" if env.get("LDS_PORT") else "GRADIO_SERVER_PORT" if env.get("GRADIO_SERVER_PORT") else None
    if port_name is None:
        return host, DEFAULT_PORT
    try:
        port = int(env[port_name])
    except ValueError:
        raise SystemExit(f"{port_name}={env[port_name]!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise SystemExit(f"{port_name}={port} is outside the port range 1-65535")
    return host, port


def is_public(settings: AppSettings, env=os.environ) -> bool:
    """Reachable by people other than the machine's owner: a Space, a share link, or a non-loopback bind."""
    return bool(env.get("SPACE_ID")) or settings.share or not (
        settings.host in LOOPBACK_HOSTS or settings.host.startswith("127."))


def safety_checker_wanted(flag: bool | None, settings: AppSettings, env=os.environ) -> bool:
    """--safety-checker / --no-safety-checker, else LDS_SAFETY_CHECKER (1/0, on/off), else on when public."""
    if flag is not None:
        return flag
    value = env.get("LDS_SAFETY_CHECKER", "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    if value:
        raise SystemExit(f"LDS_SAFETY_CHECKER={value!r}: expected 1/on or 0/off")
    return is_public(settings, env)


def zero_gpu_requested(env=os.environ) -> bool:
    """The platform marks a ZeroGPU Space with SPACES_ZERO_GPU (the `spaces` package reads the same variable)."""
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def gpu_decorator(env=os.environ):
    """`spaces.GPU` on a Hugging Face ZeroGPU Space, None elsewhere (the one place this is decided).

    Importing `spaces` there also makes torch report a CUDA device in this process, so that the model can be
    put on "cuda" at start-up (ZeroGPU moves it to a real GPU inside each call): call this before any model is
    loaded. On other hardware `spaces.GPU` does nothing, so the app does not wrap anything there."""
    if not zero_gpu_requested(env):
        return None
    try:
        import spaces  # type: ignore
    except ImportError:
        raise SystemExit("SPACES_ZERO_GPU is set but the `spaces` package is missing: add `spaces` to "
                         "requirements.txt") from None
    return spaces.GPU


def model_device(requested: str | None, *, zero_gpu: bool) -> str | None:
    """The device the model is loaded on: --device / LDS_DEVICE when given; "cuda" on ZeroGPU (where torch
    is patched to accept it in this process); else None, the engine's auto choice."""
    if requested:
        return requested
    return "cuda" if zero_gpu else None


MODEL_EVENTS_ADMITTED = 8  # model events gradio lets through at once; the engine still runs one model call at a time


def model_concurrency(engine, settings: AppSettings, *, zero_gpu: bool = False) -> int:
    """Model events admitted at once: enough for the engine to merge queued txt2img requests when merging is on
    (one model call at a time still: engine.lock), but at most 1 + queue_size, so `--queue-size` still bounds
    what waits (gradio queues the rest). One on ZeroGPU, where every admitted call would hold a GPU lease.

    With merging off, admitting several changes nothing about the order of model work (engine.lock takes one
    call at a time) and lets waiting requests show "Waiting for the model…"; Cancel reaches a request either
    way (demo/cancelling.CancelRegistry). The README's throughput figures were measured with this setting."""
    if zero_gpu:
        return 1
    batch = engine.limits.batch_requests
    return max(1, min(max(batch, MODEL_EVENTS_ADMITTED), 1 + settings.queue_size))


def build_app(engine, settings: AppSettings | None = None, *, gpu=None):
    """The whole UI for one engine: header, five task tabs, Explain, Fine-tune, "Send to" links, bounded queue.
    `gpu`: `spaces.GPU` on ZeroGPU (from gpu_decorator), else None."""
    import gradio as gr

    from demo import compare, controlnet, explain, finetune, header, inpaint, outpaint, style, txt2img
    from demo.cleanup import output_folder, sweep_interval
    from demo.outputs import TAB_LABELS
    from demo.studio import Studio

    settings = settings or AppSettings()
    age = engine.limits.max_file_age_s  # files older than this leave the disk (demo/cleanup.py)
    app = gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(sweep_interval(age), age))
    studio = Studio(gpu=gpu, model_concurrency=model_concurrency(engine, settings, zero_gpu=gpu is not None),
                    output_dir=output_folder(app))
    modules = {"txt2img": txt2img, "inpaint": inpaint, "outpaint": outpaint, "style": style,
               "controlnet": controlnet, "explain": explain, "compare": compare, "finetune": finetune}
    with app:
        header.build_header(engine)
        with gr.Tabs() as tabs:
            for tab_id, module in modules.items():
                with gr.Tab(TAB_LABELS[tab_id], id=tab_id, elem_id=f"tab-{tab_id}"):
                    module.build_tab(engine, studio=studio)
        studio.wire_send_buttons(tabs)
    app.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return app


def launch(app, engine, settings: AppSettings, **kwargs):
    """Serve `app` with the safety settings every deployment needs; kwargs go to `Blocks.launch`."""
    import gradio as gr

    from demo import cleanup
    from demo.common import CSS

    max_mb = settings.max_file_size_mb or engine.limits.max_upload_mb
    sweeper = cleanup.lifespan(app, engine.limits.max_file_age_s)  # what gradio's delete_cache does not reach
    return app.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth or None,
        auth_message="Latent Diffusion Studio: please log in." if settings.auth else None,
        max_file_size=f"{max_mb}mb",
        allowed_paths=[str(EXAMPLES_DIR)],  # example inputs only; never the models or anything else
        css=CSS,
        theme=gr.themes.Soft(),
        ssr_mode=False,
        footer_links=["api", "gradio"],
        app_kwargs={"lifespan": sweeper},
        state_session_capacity=engine.limits.max_sessions,  # memory bounded by sessions kept, not visitors seen
        **kwargs,
    )


def parse_adapter(value: str) -> tuple[str, str | None]:
    """'SOURCE' or 'SOURCE=WORD' -> (source, word or None): a LoRA file/folder/hub id and its trigger word."""
    source, _, word = value.rpartition("=") if "=" in value else (value, "", "")
    return source.strip(), (word.strip() or None)


def build_engine(model: str, *, device=None, dtype=None, attention_slicing=False, vae_tiling=False,
                 cpu_offload=False, max_batch: int | None = None, adapters: list[str] = (), threads: int | None = None,
                 safety_checker: bool = False, backend: str | None = None):
    from pipelines.engine import Engine
    from pipelines.registry import resolve_preset
    from pipelines.safety import load_safety_checker

    engine = Engine(resolve_preset(model), device=device, dtype=dtype, attention_slicing=attention_slicing,
                    vae_tiling=vae_tiling, cpu_offload=cpu_offload, threads=threads, backend=backend)
    if safety_checker:
        engine.safety = load_safety_checker(engine)  # None for the built-in model, which needs none
    if max_batch is not None:
        engine.limits = replace(engine.limits, max_batch=max_batch)
    for value in adapters:  # the same loader as the Fine-tune tab's "Load", for files the server's owner chose
        source, word = parse_adapter(value)
        name = Path(source.rstrip("/")).name.removesuffix(".safetensors")[:40] or "adapter"
        engine.adapters.load_source(source, name=name.replace("/", "-"), token=word)
    return engine


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--model",
        default=env.get("LDS_MODEL", "shapes"),
        help="preset (shapes, shapes-lcm, shapes-v2, sd15, sd15-lcm, sd15-inpainting) or a local diffusers folder "
        "[LDS_MODEL]",
    )
    parser.add_argument(
        "--device", default=env.get("LDS_DEVICE"), help="cuda, cuda:1, mps or cpu (auto if unset) [LDS_DEVICE]"
    )
    parser.add_argument("--dtype", default=env.get("LDS_DTYPE"), help="fp16, bf16 or fp32 (auto if unset) [LDS_DTYPE]")
    host, port = server_address(env)
    parser.add_argument("--host", default=host, help="address to bind [LDS_HOST, else GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=port, help="port [LDS_PORT, else GRADIO_SERVER_PORT]")
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live share link (needs --auth)"
    )
    parser.add_argument(SHARE_WITHOUT_AUTH_FLAG, action="store_true",
                        help="allow --share without --auth: anyone with the link can use the app")
    parser.add_argument(
        "--auth", default=env.get("LDS_AUTH"), help="user:password (comma-separate several) [LDS_AUTH]"
    )
    parser.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=None,
                        help="screen SD1.5-class outputs with diffusers' safety checker (default: on when public: "
                             "a Space, --share or a non-loopback --host) [LDS_SAFETY_CHECKER=1/0]")
    parser.add_argument("--max-batch", type=int, default=None, help="images per request (overrides LDS_MAX_BATCH)")
    parser.add_argument("--queue-size", type=int, default=int(env.get("LDS_QUEUE_SIZE", DEFAULT_QUEUE_SIZE)),
                        help="requests that may wait for the model [LDS_QUEUE_SIZE]")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env["LDS_THREADS"]) if env.get("LDS_THREADS") else None,
        help="CPU threads for model work (default: all usable cores but one, left to the web server) [LDS_THREADS]",
    )
    parser.add_argument("--backend", default=None,
                        help="what runs the U-Net steps: eager (PyTorch) or onnx (ONNX Runtime on the CPU, exported "
                             "once and cached; default eager) [LDS_BACKEND]")
    parser.add_argument("--attention-slicing", action="store_true", help="lower peak memory, a little slower")
    parser.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    parser.add_argument("--cpu-offload", action="store_true", help="keep idle modules in CPU memory (CUDA)")
    parser.add_argument("--adapter", action="append", default=[], metavar="SOURCE[=WORD]",
                        help="load a LoRA (.safetensors file, diffusers folder or hub id) at start; with =WORD only "
                             "prompts containing WORD use it (repeatable) [LDS_ADAPTERS, comma-separated]")
    parser.add_argument("--download", metavar="PRESET", help="pre-download a hub preset's weights, then exit")
    args = parser.parse_args(argv)
    args.adapter = [a for a in env.get("LDS_ADAPTERS", "").split(",") if a.strip()] + args.adapter
    if args.max_batch is not None and args.max_batch < 1:
        parser.error(f"--max-batch {args.max_batch}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: must be at least 1")
    if args.queue_size < 1:
        parser.error(f"--queue-size {args.queue_size}: must be at least 1")
    if args.share and not args.auth and not args.share_without_auth:
        parser.error(f"--share puts the app on the public internet: add --auth user:password (or LDS_AUTH), "
                     f"or pass {SHARE_WITHOUT_AUTH_FLAG} to share it without a login")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.download:
        from pipelines.engine import download
        from pipelines.registry import resolve_preset

        fetched = download(resolve_preset(args.download))
        print("downloaded: " + (", ".join(fetched) if fetched else "nothing (all weights are local)"))
        return 0
    auth = parse_auth(args.auth)  # a malformed --auth fails before minutes of model loading
    settings = AppSettings(host=args.host, port=args.port, share=args.share, auth=auth,
                           queue_size=args.queue_size)
    from demo.cleanup import own_cache_folder

    # Gradio's cache (every file the app makes or receives) in a folder of the app's own, which its sweep may
    # empty of old files (demo/cleanup.py); an explicit GRADIO_TEMP_DIR is kept
    os.environ["GRADIO_TEMP_DIR"] = own_cache_folder()
    gpu = gpu_decorator()  # before torch touches CUDA: on ZeroGPU importing `spaces` patches it
    from pipelines import compute
    from pipelines.common import ModelNotAvailable

    if gpu is not None:  # ZeroGPU's CUDA emulation lives on this thread only: the model is loaded and changed here
        compute.adopt_current_thread()
    try:
        engine = build_engine(
            args.model,
            device=model_device(args.device, zero_gpu=gpu is not None),
            dtype=args.dtype,
            attention_slicing=args.attention_slicing,
            vae_tiling=args.vae_tiling,
            cpu_offload=args.cpu_offload,
            max_batch=args.max_batch,
            adapters=args.adapter,
            threads=args.threads,
            backend=args.backend,
            safety_checker=safety_checker_wanted(args.safety_checker, settings),
        )
    except (ModelNotAvailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if gpu is not None:  # every call runs in a worker forked from this process: load lazy models here, once
        engine.preload()
    app = build_app(engine, settings, gpu=gpu)
    launch(app, engine, settings, prevent_thread_lock=gpu is not None)
    if gpu is not None:
        compute.model_thread().serve_forever()  # this thread now runs the model work of other threads
    return 0


if __name__ == "__main__":
    sys.exit(main())
