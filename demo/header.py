"""The page header: title, what this app shows, and which model is loaded on what device."""
from __future__ import annotations

import gradio as gr

INTRO = ("A latent diffusion model (LDM) encodes an image into a small latent with a VAE, denoises random "
         "latents step by step with a text-conditioned U-Net, and decodes the result. Every tab below uses "
         "the same loaded model.")


def model_line(info: dict) -> str:
    kind = "built-in Shapes LDM, trained in this repository" if info.get("builtin") else info.get("base", "")
    controls = ", ".join(info.get("controls") or []) or "none"
    return (f"**Model:** `{info.get('model')}` ({kind}) · **device** {info.get('device')} / {info.get('dtype')} · "
            f"**size** {info.get('default_size')} px (max {info.get('max_size')}) · "
            f"**latent** f={info.get('vae_scale_factor')} · **ControlNets:** {controls}")


def build_header(engine) -> None:
    info = engine.info()
    gr.Markdown(f"# Latent Diffusion Studio\n{INTRO}\n\n{model_line(info)}", elem_id="lds-header")
    vocab = engine.vocabulary()
    if vocab:
        with gr.Accordion(f"The model's vocabulary ({len(vocab)} words)", open=False):
            gr.Markdown(", ".join(f"`{w}`" for w in vocab))
