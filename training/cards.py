"""Model cards (README.md) for the shipped annotators and ControlNets, written from their training records
and the held-out scores of `python -m training.evaluate --controls --write-cards`."""
from __future__ import annotations

import json
from pathlib import Path

from training.common import SHIPPED_BASE
from training.evaluate import EDGE_TOLERANCE_PX, PCK_ALPHA

LIMITS = """## Limits
- Trained on the procedural Shapes world only (64x64 renders). On photos or other art it returns a map,
  but not a meaningful one: use the Hub models (`--model sd15`, controlnet-aux annotators) for real pictures.
- Inputs of other sizes are resized to 64x64 (aspect ratio not kept) and the map is resized back, so
  detail finer than 1/64 of the picture is lost.
"""


def _curve(history: list[dict]) -> str:
    """The held-out scores logged during training, one row per evaluation."""
    if not history:
        return ""
    keys = [k for k in history[0] if k not in ("step", "seconds")]
    rows = ["| step | minutes | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    rows += [
        f"| {h['step']} | {h['seconds'] / 60:.1f} | "
        + " | ".join(f"{h.get(k, float('nan')):.4g}" for k in keys)
        + " |"
        for h in history
    ]
    return "\n".join(rows)


def _options(train: dict) -> str:
    share = train.get("low_contrast_share", 0)
    return f", washed-out augmentation on {share:.0%} of samples" if share else ""


def _format(scores: dict) -> str:
    return "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scores.items())


def _schedule_options(info: dict) -> list[str]:
    """train_annotators' step options, one per stretch of the learning-rate schedule the run went through
    (config.json's "schedule": the --max-steps of each stretch and the step it stopped at)."""
    steps = info.get("steps", 1200)
    stretches = info.get("schedule") or [{"max_steps": steps, "until": steps}]
    return [f"--max-steps {s['max_steps']}" + (f" --stop-at {s['until']}" if s["until"] < s["max_steps"] else "")
            for s in stretches]


def write_annotator_card(folder: Path, kind: str, scores: dict) -> Path:
    """README.md for assets/models/shapes-annotators/<kind> from its config.json and `scores`."""
    folder = Path(folder)
    info = json.loads((folder / "config.json").read_text())
    train = info.get("train", {})
    if kind == "depth":
        task = ("Picture -> depth map in [0, 1] (1 = near, the ControlNet convention), drawn as a grey RGB image "
                "the size of the input.")
        architecture = (f"`DepthNet`: a 4-level U-Net (channels {info['config']['channels']}, GroupNorm + SiLU, "
                        "a dilated residual block at 8x8) on RGB + 2 coordinate channels (CoordConv), sigmoid output.")
        data = (f"{train.get('train_scenes', '?')} Shapes-world renders (seeds 0..), target `sample.depth`; "
                "augmented with colour jitter, blur, noise, a down-up resize and horizontal flips.")
        loss = "L1 over all pixels + 0.5 x relative error on pixels with depth > 0."
        metric = ("abs-rel = mean |pred - true| / true over pixels with true depth > 0 (the sky, depth 0 = infinitely "
                  "far, is left out); MAE over all pixels.")
    else:
        task = ("Picture -> OpenPose body-18 keypoints -> skeleton drawn with controlnet-aux's `draw_bodypose` "
                "(OpenPose colours, the same drawing as `training.shapes.pose_to_image` and the SD1.5 openpose "
                "ControlNet's training maps). A picture without a person gives a black map. Option: "
                "`threshold` (visibility probability, default 0.5).")
        architecture = (f"`PoseNet`: strided convs (channels {info['config']['channels']}) to 16x16, dilated residual "
                        f"blocks (dilations {info['config']['residual_dilations']}), 18 heatmaps with soft-argmax "
                        "(sub-pixel x, y) and 18 visibility logits from pooled features.")
        data = (f"{train.get('train_scenes', '?')} Shapes-world renders with a person (seeds from 0 up whose scene "
                f"holds a person) plus {train.get('no_person_share', 0.2):.0%} as many without one (visibility 0); "
                "augmented with colour jitter, blur, noise and a down-up resize.")
        loss = "L1 of soft-argmax keypoints + 0.1 x heatmap cross-entropy to a Gaussian target + visibility BCE."
        metric = (f"PCK@{PCK_ALPHA}: a keypoint is correct if predicted visible and within {PCK_ALPHA} x "
                  "max(width, height) of the person's rendered bounding box (about 40 px, so about 4 px) of the "
                  "truth; over all visible true keypoints of held-out person scenes.")
    minutes = info.get("train_seconds", 0) / 60
    vae = info.get("vae")
    if vae:
        data += (f" Half of each batch is the same pictures after the Shapes VAE's encode/decode ({vae}), which is "
                 "what every generated picture goes through.")
    size = scores.get("mean_person_size_px")
    if kind == "pose" and size:
        metric = metric.replace("(about 40 px, so about 4 px)", f"(mean {size:.1f} px, so about {0.1 * size:.1f} px)")
    limits = LIMITS
    if kind == "pose":
        limits += ("- The visibility head was trained on Shapes scenes only: on photo-like pictures it often "
                   "reports a person and draws a skeleton that is not there.\n")
    reproduce_vae = (f" --vae {vae}" if vae else "") + (
        f" --low-contrast-share {train['low_contrast_share']}" if train.get("low_contrast_share") else "")
    train_commands = "\n".join(
        f"python -m training.train_annotators --kind {kind} --out runs/annotator-{kind} {stretch} --threads 1"
        f"{reproduce_vae}" for stretch in _schedule_options(info))
    text = f"""# Shapes-world {kind} annotator

{task} Used by the app's ControlNet tab (preprocessor "{kind}") for the built-in model through
`training.annotators.load_annotator("{kind}", folder)`, and by `training.evaluate --controls` to measure
how well the {kind} ControlNet's outputs follow their control maps.

## Model
- Architecture: {architecture}
- Parameters: {info.get('parameters', '?'):,}; weights `model.safetensors`, settings `config.json`.
- Input: any RGB picture, resized to 64x64 for the net; output at the input's size.

## Training
- Data: {data}
- Loss: {loss}
- AdamW, batch {train.get('batch_size', '?')}, learning rate {train.get('learning_rate', '?')} \
with warm-up and cosine decay.
- Steps: {info.get('steps', '?')}; training time {minutes:.0f} min on 1 CPU thread at low priority (nice 10,
  sharing 2 cores with the LDM's training run).
- Code: `training/train_annotators.py` at commit {info.get('code_commit') or '?'}{_options(train)}.\
{chr(10) + "- Note: " + info["note"] + "." if info.get("note") else ""}

## Held-out scores
Scenes from seed `training.common.HELD_OUT_SEED` up (never used in training). {metric}
`_vae_round_trip`: the same renders after the Shapes VAE's encode/decode (closer to generated pictures).

| metric | value |
|---|---|
{_format(scores)}

Training curve ({info.get('train', {}).get('eval_count', '?')} held-out scenes per evaluation):

{_curve(info.get('history', []))}

{limits}
## Reproduce
```
{train_commands}
cp runs/annotator-{kind}/annotator/* assets/models/shapes-annotators/{kind}/
python -m training.evaluate --controls --write-cards
```
"""
    (folder / "README.md").write_text(text)
    return folder / "README.md"


def _controlnet_base(info: dict) -> tuple[str, str, str]:
    """(the card's sentence on the base model, the commands that fetch that base, its folder for --ldm) from
    training.json's ldm, ldm_step and ldm_commit. A ControlNet follows the U-Net it was trained against, so the
    Reproduce commands train against that step, taken from the commit that holds it."""
    step, commit, folder = info.get("ldm_step"), info.get("ldm_commit"), info.get("ldm", "assets/models/shapes-ldm")
    step_file = SHIPPED_BASE / "TRAINING_STEP"
    shipped = step_file.read_text().strip() if step_file.is_file() else None
    if step is None:
        return "", "", folder
    line = f"Trained against the Shapes LDM at step {step:,}"
    if shipped is not None and int(shipped) != step:
        line += (f"; the scores below are with the shipped LDM (step {int(shipped):,}), which the ControlNet "
                 f"follows without retraining")
    line += "."
    if commit is None:
        return line, "", f"{folder} --ldm-step {step}"
    target = f"runs/ldm-step-{step}"
    commands = (f"# the base it was trained against: the LDM at step {step:,}, as commit {commit} holds it\n"
                f"mkdir -p {target} && git archive {commit} {folder} | tar -x -C {target}\n")
    return line, commands, f"{target}/{folder} --ldm-step {step}"


def _controlnet_options(info: dict) -> str:
    """train_controlnet options for the recorded settings that differ from its defaults."""
    from training.train_controlnet import ControlNetConfig

    flags = {"train_scenes": "--train-scenes", "batch_size": "--batch-size", "learning_rate": "--learning-rate",
             "caption_dropout": "--caption-dropout", "sample_steps": "--sample-steps", "world": "--world",
             "captions": "--captions"}
    recorded, default = info.get("config", {}), ControlNetConfig()
    return "".join(f" {flag} {recorded[name]}" for name, flag in flags.items()
                   if name in recorded and recorded[name] != getattr(default, name))


def write_controlnet_card(folder: Path, control: str, scores: dict) -> Path:
    """README.md for assets/models/shapes-controlnet-<control> from its training.json and `scores`."""
    folder = Path(folder)
    info = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
    config = json.loads((folder / "config.json").read_text())
    train = info.get("config", {})
    map_text = {
        "canny": "white OpenCV Canny edges (thresholds 100/200) on black",
        "depth": "grey depth map, white = near",
        "pose": "OpenPose-colour skeleton on black (controlnet-aux's drawing)",
    }[control]
    metric = {
        "canny": (
            f"edge F1 between OpenCV Canny (100/200) of the output and the control edges; an edge pixel "
            f"matches an edge of the other map within {EDGE_TOLERANCE_PX} px (Chebyshev distance)."
        ),
        "depth": (
            "Pearson correlation between the depth annotator's map of the output and the control depth, "
            "per image, averaged."
        ),
        "pose": (
            f"PCK@{PCK_ALPHA} of the pose annotator's keypoints of the output against the control keypoints "
            "(threshold 0.1 x max side of the control person's box)."
        ),
    }[control]
    world, captions = train.get("world", 1), train.get("captions", "caption")
    data = ("Shapes-world scenes with a person (seeds from 0 up whose scene holds a person)"
            if control == "pose" else "Shapes-world scenes (seeds 0..)")
    if world == 2:
        data = data.replace("Shapes-world", "world-2 Shapes-world") + (
            ", people with free joint angles around and between the named poses (docs/MODEL_V2.md)"
            if control == "pose" else "")
    if captions == "control":
        data += (", captions without pose words (the map decides the pose)" if control == "pose" else
                 ', captions that leave the form to the map ("a green shape on the left in snow")')
    base_line, base_commands, base_folder = _controlnet_base(info)
    text = f"""# Shapes-world {control} ControlNet

A ControlNet (Zhang et al. 2023) for the built-in Shapes LDM (`assets/models/shapes-ldm`): control map =
{map_text}, 64x64. Load with `ControlNetModel.from_pretrained(folder)` and use it in
`StableDiffusionControlNetPipeline` with the Shapes LDM's U-Net, VAE and text encoder.

## Model
- A trainable copy of the Shapes U-Net's encoder (conv_in, time and text embeddings, down blocks, mid block)
  with zero-initialised output convs; conditioning embedding channels \
{tuple(config.get('conditioning_embedding_out_channels', ()))}
  (three entries: two stride-2 stages, 64x64 map -> 16x16, because the VAE is f=4);
  `addition_embed_type_num_heads={config.get('addition_embed_type_num_heads')}` as the U-Net's.
- Parameters: {info.get('parameters', '?'):,} (the U-Net, VAE and text encoder stay frozen).

## Training
- Data: {info.get('train_scenes', '?')} {data}: (control map, caption, image); latents and caption embeddings cached.
- The U-Net's own target ({train.get('prediction_type', 'v_prediction')}; x0 error weighted by \
min(SNR, {train.get('min_snr_gamma', 5.0)}) + 1 for v), caption dropout {train.get('caption_dropout', 0.1)},
  AdamW, batch {train.get('batch_size', '?')}, learning rate {train.get('learning_rate', '?')}; \
Stable Diffusion's noise schedule.
- Steps: {info.get('steps', '?')}; training time {info.get('train_seconds', 0) / 60:.0f} min on CPU.

## Held-out control following on world-1 maps
Control maps of held-out world-1 scenes (seeds from `training.common.HELD_OUT_SEED` up) with their captions,
{scores.get('steps', 20)} DPM-Solver++ steps, guidance {scores.get('guidance', 4.0)}. Metric: {metric}
`_reference` scores the held-out renders themselves (the ceiling of the measure); `_without_controlnet`
the LDM alone on the same captions and seeds (what the text alone gives).
{base_line}

| metric | value |
|---|---|
{_format(scores)}

{_world2_section(folder, control)}## Limits
- Shapes-world maps at 64x64 (the app allows up to 128x128, where following is looser).
- Depth and pose following are measured with the learned Shapes annotators, so their errors count too.

## Reproduce
```
{base_commands}python -m training.train_controlnet --control {control} --ldm {base_folder} \
--out runs/controlnet-{control} --max-steps {info.get('steps', 2000)}{_controlnet_options(info)} --threads 1
cp -r runs/controlnet-{control}/controlnet/. assets/models/shapes-controlnet-{control}/
{_world2_commands(folder, control)}python -m training.evaluate --controls --write-cards
```
"""
    (folder / "README.md").write_text(text)
    return folder / "README.md"


WORLD2_SCORES = "scores-world2.json"  # a ControlNet folder's figures on world-2 maps (training.evaluate_v2)


def _world2_section(folder: Path, control: str) -> str:
    """The card's table of world-2 control following, from the folder's WORLD2_SCORES (what
    `python -m training.evaluate_v2 --world 2 --measures pose,silhouette` measured on the test split), if any."""
    path = Path(folder) / WORLD2_SCORES
    if not path.is_file():
        return ""
    report = json.loads(path.read_text())
    rows = report["rows"]
    lines = [f"## Control following on world-2 maps ({report['split']} split)",
             f"{report['note']}", "",
             "| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n\n"


def _world2_measure(control: str) -> str:
    """The training.evaluate_v2 measure that scores a ControlNet of this kind."""
    return "pose" if control == "pose" else "silhouette"


def _world2_commands(folder: Path, control: str) -> str:
    """Reproduce lines for the world-2 table, when the card has one."""
    if not (Path(folder) / WORLD2_SCORES).is_file():
        return ""
    report = f"runs/eval-v2/controlnet-{control}-test.json"
    return (f"python -m training.evaluate_v2 --world 2 --split test --measures {_world2_measure(control)} --count 60 "
            f"--controlnet {control}=assets/models/shapes-controlnet-{control} --json {report}\n"
            f"python -m training.cards --world2 {control}={report}\n")


def world2_scores(control: str, report: dict, previous: dict | None = None) -> dict:
    """WORLD2_SCORES for one ControlNet from `training.evaluate_v2 --world 2 --json` reports: `report` measured
    this ControlNet, `previous` (optional) the ControlNet it replaces on the same split, maps and seeds."""
    def pick(source, key, field):
        return f"{source[key][field]:.3f}" if source and key in source else "-"

    goal = "PCK@0.1 >= 0.8 and >= 0.3 above without" if control == "pose" else "IoU >= 0.7 and >= 0.3 above without"
    if control == "pose":
        keys, field, label = [("pose", "without pose words")], "pck", "PCK@0.1"
    else:
        keys = [(f"silhouette {control} form-free", 'form left to the map ("a green shape")'),
                (f"silhouette {control} named", "the form named")]
        field, label = "iou", "silhouette IoU"
    rows = []
    for key, captions in keys:
        row = {"captions": captions, "maps": report[key]["maps"],
               f"{label}: this ControlNet": pick(report, key, field)}
        if previous is not None:
            row[f"{label}: the previous one (world 1)"] = pick(previous, key, field)
        row[f"{label}: without a ControlNet"] = pick(report, key, f"{field}_without_controlnet")
        if control == "pose":
            row[f"{label}: the renders themselves"] = pick(report, key, "pck_renders")
        rows.append(row)
    split = report.get("split", "test")
    note = (f"Control maps of {split}-split world-2 scenes, 64x64, {report.get('steps', 20)} DPM-Solver++ steps, "
            f"guidance {report.get('guidance', 2.5):g}, one seed per "
            f"map (`python -m training.evaluate_v2 --world 2 --split {split} --measures {_world2_measure(control)}`; "
            f"docs/MODEL_V2.md). Goal: {goal}.")
    return {"split": split, "note": note, "rows": rows}


def scores_from_card(card: Path) -> dict:
    """The held-out scores table of a card written here (`| metric | value |`), as numbers: the last scores
    `training.evaluate --controls --write-cards` measured, for rewriting a card without measuring again."""
    scores, in_table = {}, False
    for line in Path(card).read_text().splitlines():
        if line.strip() == "| metric | value |":
            in_table = True
            continue
        if in_table and line.startswith("|---"):
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table:
            key, value = (cell.strip() for cell in line.strip("|").split("|"))
            try:
                scores[key] = int(value)
            except ValueError:
                try:
                    scores[key] = float(value)
                except ValueError:
                    scores[key] = value
    return scores


def main(argv=None) -> None:
    """Rewrite every shipped ControlNet and annotator card from its records (training.json / config.json) and
    the scores its card already shows; `python -m training.evaluate --controls --write-cards` measures anew."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--models", type=Path, default=SHIPPED_BASE.parent, help="the folder holding the models")
    parser.add_argument("--world2", action="append", default=[], metavar="KIND=REPORT[:PREVIOUS]",
                        help="first write shapes-controlnet-KIND/" + WORLD2_SCORES + " from evaluate_v2 --json "
                             "reports: this ControlNet's, and optionally the one it replaced")
    args = parser.parse_args(argv)
    for item in args.world2:
        kind, _, paths = item.partition("=")
        report, _, previous = paths.partition(":")
        folder = args.models / f"shapes-controlnet-{kind}"
        scores = world2_scores(kind, json.loads(Path(report).read_text()),
                               json.loads(Path(previous).read_text()) if previous else None)
        (folder / WORLD2_SCORES).write_text(json.dumps(scores, indent=2) + "\n")
    for control in ("canny", "depth", "pose"):
        folder = args.models / f"shapes-controlnet-{control}"
        if (folder / "README.md").is_file():
            print(write_controlnet_card(folder, control, scores_from_card(folder / "README.md")))
    for kind in ("depth", "pose"):
        folder = args.models / "shapes-annotators" / kind
        if (folder / "README.md").is_file():
            print(write_annotator_card(folder, kind, scores_from_card(folder / "README.md")))


if __name__ == "__main__":
    main()
