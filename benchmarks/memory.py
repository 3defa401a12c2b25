"""2. Sharing: memory of every task pipeline the five tabs use, made by the engine from one base model, against
the same pipelines loaded separately, and against the least a script needs (one txt2img pipeline + the three
ControlNets, with the same tab pipelines made by hand over its components).

Each configuration runs in a fresh subprocess, so its memory is its own:
- weights: bytes of the unique parameter and buffer tensors of every module the pipelines hold (exact);
- RSS: resident memory after loading (and reading every weight once: safetensors memory-maps the files)
  minus resident memory after the imports (psutil);
- peak: the process's peak RSS (getrusage) minus that baseline, after one 1-step run of every pipeline
  (the built-in model only; the SD1.5-shaped one is loaded in fp16 and not run on a CPU).

Pipelines the tabs use (task, ControlNets): txt2img; inpaint (Inpaint and Outpaint tabs, with the preset's 9-channel
inpainting U-Net when it has one, in every configuration); img2img and
controlnet_img2img with canny / depth (Style transfer); controlnet with canny / depth / pose (ControlNet).

    python -m benchmarks.memory [--model FOLDER] [--no-sd15] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from benchmarks.common import REPO, Options, Row, model_folder, standalone

PART = "2 sharing"
GOAL = "<= 1.15"
TAB_PIPELINES = (("txt2img", ()), ("inpaint", ()), ("img2img", ()),
                 ("controlnet_img2img", ("canny",)), ("controlnet_img2img", ("depth",)),
                 ("controlnet", ("canny",)), ("controlnet", ("depth",)), ("controlnet", ("pose",)))
MB = 1024 * 1024


# --- the child: one configuration in a fresh process ---------------------------------------------------------

def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _unique_bytes(pipes) -> int:
    import torch

    seen, total = set(), 0
    for pipe in pipes:
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
                if key not in seen:
                    seen.add(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def _touch(pipes) -> None:
    """Read every weight once. safetensors loads by memory-mapping the files, so untouched weights are not
    resident yet; after this, RSS holds every weight the process would use."""
    import torch

    with torch.inference_mode():
        for pipe in pipes:
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    for tensor in [*module.parameters(), *module.buffers()]:
                        tensor.sum()


def _inputs(task: str, size: int) -> dict:
    from PIL import Image

    image = Image.new("RGB", (size, size), "gray")
    mask = Image.new("L", (size, size), 255)
    return {
        "txt2img": dict(width=size, height=size),
        "img2img": dict(image=image, strength=1.0),
        "inpaint": dict(image=image, mask_image=mask, strength=1.0, width=size, height=size),
        "controlnet": dict(image=image, width=size, height=size),
        "controlnet_img2img": dict(image=image, control_image=image, strength=1.0),
    }[task]


def _use(pipes: list[tuple[str, object]], size: int) -> None:
    import torch

    for task, pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipe("a red circle", num_inference_steps=1, guidance_scale=4.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), **_inputs(task, size))


def child(config: str, folder: str, controls: dict[str, str], dtype: str, run_size: int) -> dict:
    import diffusers  # noqa: F401  (imports belong to the baseline)
    import torch
    import transformers  # noqa: F401

    from benchmarks.common import preset_for, quiet_libraries
    from pipelines.engine import DTYPES, Engine, _dtype_kwarg, _task_classes

    quiet_libraries()
    torch.set_num_threads(1)
    torch.ones(8, 8) @ torch.ones(8, 8)
    # Import every class the configurations use before the baseline: code is not what is compared.
    from diffusers import ControlNetModel  # noqa: F401
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel  # noqa: F401

    _task_classes()
    base_rss = _rss()
    torch_dtype = DTYPES[dtype]
    kwargs = dict(**_dtype_kwarg(torch_dtype), use_safetensors=True)
    pipes: list[tuple[str, object]] = []
    # A dedicated inpainting U-Net (the built-in preset's) serves the Inpaint and Outpaint tabs in every
    # configuration: a script that inpaints as the app does loads it too.
    inpaint_model = preset_for(folder).inpaint_model

    def inpaint_unet():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(inpaint_model, subfolder="unet", **kwargs)

    if config == "shared":
        import dataclasses

        preset = dataclasses.replace(preset_for(folder), controlnets=dict(controls))
        engine = Engine(preset, device="cpu", dtype=dtype)
        for task, ctrl in TAB_PIPELINES:
            pipes.append((task, engine.pipeline(task, controls=ctrl)))
    else:
        from diffusers import ControlNetModel, StableDiffusionPipeline

        extra = dict(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
        if config == "separate":
            classes = _task_classes()
            for task, ctrl in TAB_PIPELINES:
                more = {"controlnet": ControlNetModel.from_pretrained(controls[ctrl[0]], **kwargs)} if ctrl else {}
                if task == "inpaint" and inpaint_model:
                    more["unet"] = inpaint_unet()
                pipes.append((task, classes[task].from_pretrained(folder, **kwargs, **extra, **more)))
        else:  # "single": one txt2img pipeline + three ControlNets; the same workloads through pipelines
            # made directly from its components (the least that serves every tab, written by hand)
            base = StableDiffusionPipeline.from_pretrained(folder, **kwargs, **extra)
            nets = {c: ControlNetModel.from_pretrained(controls[c], **kwargs) for c in ("canny", "depth", "pose")}
            classes = _task_classes()
            nine = inpaint_unet() if inpaint_model else None
            for task, ctrl in TAB_PIPELINES:
                more = {"controlnet": nets[ctrl[0]]} if ctrl else {}
                if task == "inpaint" and nine is not None:
                    more["unet"] = nine
                pipes.append((task, base if task == "txt2img" else classes[task](**{**base.components, **more})))
    _touch([p for _, p in pipes])
    loaded_rss = _rss()
    weights = _unique_bytes([p for _, p in pipes])
    first = pipes[0][1]
    base_bytes = sum(_unique_bytes([_Holder({n: getattr(first, n)})]) for n in ("unet", "vae", "text_encoder"))
    controlnet_bytes = _unique_bytes([_Holder({"c": pipes[-1][1].controlnet})])
    inpaint_pipe = next(p for task, p in pipes if task == "inpaint")
    inpaint_bytes = _unique_bytes([_Holder({"u": inpaint_pipe.unet})]) if inpaint_pipe.unet is not first.unet else 0
    if run_size:
        _use(pipes, run_size)
    return dict(weights=weights, rss=loaded_rss - base_rss, peak=_peak() - base_rss if run_size else None,
                pipelines=len(pipes), base_bytes=base_bytes, controlnet_bytes=controlnet_bytes,
                inpaint_bytes=inpaint_bytes)


class _Holder:
    """Something with `.components`, for _unique_bytes over chosen modules."""

    def __init__(self, components: dict):
        self.components = components


def _spawn(config: str, folder: str, controls: dict, dtype: str, run_size: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "benchmarks.memory", "--child", config, "--folder", folder,
               "--controls", json.dumps({k: str(v) for k, v in controls.items()}), "--dtype", dtype,
               "--run-size", str(run_size)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


ROW_NAMES = {
    "rss": "all tab pipelines via engine vs 1 txt2img + 3 ControlNets (RSS)",
    "weights": "same, unique weight bytes",
    "peak": "same, peak RSS after using every pipeline once",
    "separate": "same pipelines loaded separately vs via engine",
    "inpaint": "the 9-channel inpainting U-Net (Inpaint, Outpaint) over the base model's weights",
}


def _rows(label: str, results: dict[str, dict]) -> list[Row]:
    shared, single, separate = results["shared"], results["single"], results["separate"]
    rows = [
        Row(PART, f"{label}: {ROW_NAMES['rss']}", shared["rss"] / single["rss"], goal=GOAL,
            detail=f"{shared['rss'] / MB:.0f} MB vs {single['rss'] / MB:.0f} MB resident after loading "
                   f"({shared['pipelines']} pipelines vs 1 + 3 ControlNets)"),
        Row(PART, f"{label}: {ROW_NAMES['weights']}", shared["weights"] / single["weights"], goal=GOAL,
            detail=f"{shared['weights'] / MB:.1f} MB vs {single['weights'] / MB:.1f} MB"),
    ]
    if shared.get("peak") and single.get("peak"):
        rows.append(Row(PART, f"{label}: {ROW_NAMES['peak']}", shared["peak"] / single["peak"], goal=GOAL,
                        detail=f"{shared['peak'] / MB:.0f} MB vs {single['peak'] / MB:.0f} MB (1 step, "
                               f"{results['run_size']}x{results['run_size']})"))
    if separate.get("rss") is not None:
        value = separate["rss"] / shared["rss"]
        detail = f"{separate['rss'] / MB:.0f} MB vs {shared['rss'] / MB:.0f} MB resident"
    else:
        value = separate["weights"] / shared["weights"]
        detail = (f"from weight bytes ({separate['pipelines']} full copies would not fit in RAM): "
                  f"{separate['weights'] / MB:.0f} MB vs {shared['weights'] / MB:.0f} MB")
    rows.append(Row(PART, f"{label}: {ROW_NAMES['separate']}", value, detail=detail))
    if shared.get("inpaint_bytes"):
        rows.append(Row(PART, f"{label}: {ROW_NAMES['inpaint']}", shared["inpaint_bytes"] / shared["base_bytes"],
                        detail=f"+{shared['inpaint_bytes'] / MB:.1f} MB on {shared['base_bytes'] / MB:.1f} MB "
                               f"(U-Net, VAE, text encoder), loaded on the first inpainting run"))
    return rows


def skipped_rows(label: str, why: str) -> list[Row]:
    return [Row(PART, f"{label}: {ROW_NAMES[k]}", float("nan"), detail=f"skipped ({why})")
            for k in ("rss", "weights", "separate")]


def _separate_from_parts(single: dict) -> dict:
    """Weight bytes of the tab pipelines loaded separately: each holds its own U-Net, VAE, text encoder and
    ControlNet (sizes from the single configuration's modules)."""
    total = sum(single["base_bytes"] + (single["controlnet_bytes"] if ctrl else 0) for _, ctrl in TAB_PIPELINES)
    return dict(weights=total, rss=None, peak=None, pipelines=len(TAB_PIPELINES))


def run(opts: Options) -> list[Row]:
    from benchmarks.models import random_controlnets, sd15_random

    folder, note = model_folder(opts)
    if note:
        opts.notes.append(note)
    controls, random = random_controlnets(folder)
    if random:
        opts.notes.append("built-in ControlNets do not exist yet: the memory rows use random ControlNets made "
                          "from the built-in U-Net (training.train_controlnet.controlnet_from_unet)")
    size = 0 if opts.quick else 64
    builtin = {c: _spawn(c, folder, controls, "fp32", size, opts.threads) for c in ("shared", "single", "separate")}
    rows = _rows("built-in", {**builtin, "run_size": size})
    if not opts.sd15 or opts.quick:
        return rows + skipped_rows("SD1.5-shaped", "--quick" if opts.quick else "--no-sd15")
    sd_folder, sd_controls = sd15_random("fp16")
    sd = {c: _spawn(c, str(sd_folder), sd_controls, "fp16", 0, opts.threads) for c in ("shared", "single")}
    sd["separate"] = _separate_from_parts(sd["single"])
    opts.notes.append(f"SD1.5-shaped model: random weights, fp16, built once in {sd_folder.parent} "
                      "(configs in benchmarks/models.py); loaded, not run")
    return rows + _rows("SD1.5-shaped", {**sd, "run_size": 0})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--child")
    known, rest = parser.parse_known_args(argv)
    if known.child:
        parser.add_argument("--folder")
        parser.add_argument("--controls")
        parser.add_argument("--dtype")
        parser.add_argument("--run-size", type=int, default=0)
        args = parser.parse_args(argv)
        result = child(args.child, args.folder, json.loads(args.controls), args.dtype, args.run_size)
        print(json.dumps(result))
        return 0
    return standalone(PART, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
