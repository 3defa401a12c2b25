"""Adapters on the one shared model: fine-tuned LoRAs and U-Nets, each switched on per request by its word.

An adapter is what the Fine-tune tab trains, or a LoRA file someone loads (a diffusers, kohya or A1111
`.safetensors`, e.g. LCM-LoRA):
- kind "lora": LoRA weights injected into the shared U-Net with peft, next to any other adapters;
- kind "full": a whole fine-tuned U-Net, used instead of the shared one by the requests that ask for it;
- optionally a learned embedding for its trigger word, when the tokenizer did not know the word (the
  built-in model's word-level vocabulary; CLIP's BPE spells any word, so SD1.5 needs none).

A request uses the *enabled* adapters whose trigger word its prompt contains (an adapter without a word
applies to every request while enabled). Every other request runs the base model exactly as before, so
one user's fine-tune never changes another user's images. The LoRA state of the shared U-Net is set per
request under `engine.lock` (all model work holds it), never left to chance between requests.

File format (one `.safetensors`, what `save` writes and `load_file` reads back):
    unet.*           LoRA weights, peft key names (diffusers' `load_lora_weights` reads the file as it is)
    unet_full.*      a full fine-tune's U-Net state dict (kind "full")
    token_embedding  (hidden,) the learned vector of the trigger word, if the tokenizer lacked it
    metadata         {"lds_token", "lds_kind", "lds_base", "lds_info" (JSON)}
"""
from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.common import InputError, ModelError, check_float
from pipelines.loading import load_errors, not_available
from pipelines.world.text import is_word_level

KINDS = ("lora", "full")
TOKEN_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,23}$")  # one lower-case word: what a word-level tokenizer can add
EVERY_PROMPT = "none"  # the trigger word that loads an adapter for every request
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


@dataclass
class Adapter:
    name: str
    kind: str  # "lora" | "full"
    token: str | None  # trigger word; None: every request while enabled
    enabled: bool = True
    scale: float = 1.0  # LoRA strength (A1111's <lora:name:scale>)
    unet: Any = None  # kind "full": the fine-tuned U-Net
    token_embedding: torch.Tensor | None = None  # (hidden,) learned vector of a word added to the tokenizer
    info: dict[str, Any] = field(default_factory=dict)  # how it was made (steps, images, method, time, ...)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "token": self.token, "enabled": self.enabled,
                "scale": self.scale, "learned_word": self.token_embedding is not None, **self.info}


def prompt_words(prompts: Any) -> set[str]:
    """Lower-case words of a prompt, a list of prompts or None."""
    if prompts is None:
        return set()
    if isinstance(prompts, str):
        prompts = [prompts]
    return {w for p in prompts if p for w in re.findall(r"[a-z0-9_]+", str(p).lower())}


class AdapterSet:
    """The adapters of one engine (`engine.adapters`). Every method that touches a model holds engine.lock."""

    def __init__(self, engine):
        self.engine = engine
        self._adapters: dict[str, Adapter] = {}
        self._lora_state: tuple | None = None  # (names, scales) last set on the shared U-Net; None: unknown
        self._unk_vectors: dict[str, torch.Tensor] = {}  # word -> what the word meant before it was added
        self.training = threading.Event()  # set while a fine-tune runs (one at a time)

    # --- what is there ----------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def get(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise InputError(f"adapter={name!r} is not loaded; loaded: {', '.join(self._adapters) or 'none'}")
        return self._adapters[name]

    def describe(self) -> list[dict[str, Any]]:
        return [a.describe() for a in self._adapters.values()]

    def tokens(self) -> dict[str, str]:
        """trigger word -> adapter name, for every adapter that has a word."""
        return {a.token: a.name for a in self._adapters.values() if a.token}

    def disabled_words(self) -> set[str]:
        """Words the tokenizer learned from adapters that are switched off (they mean nothing now)."""
        return {
            a.token for a in self._adapters.values() if a.token and not a.enabled and a.token_embedding is not None
        }

    def active_for(self, prompts: Any) -> tuple[str, ...]:
        """Names of the enabled adapters this request uses (sorted: it is also part of the batching key)."""
        words = prompt_words(prompts)
        return tuple(sorted(a.name for a in self._adapters.values()
                            if a.enabled and (a.token is None or a.token in words)))

    def check_name(self, name: str) -> str:
        """A valid name no loaded adapter has."""
        name = str(name or "").strip()
        if not NAME_PATTERN.match(name):
            raise InputError(
                f"adapter name {name!r} must be 1-48 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        if name in self._adapters:
            raise InputError(f"adapter name {name!r} is taken; remove that adapter first or choose another name")
        return name

    def check_token(self, token: str | None) -> str | None:
        """A valid trigger word no adapter uses and the model does not already know; None for none."""
        if token is None or str(token).strip() == "":
            return None
        token = str(token).strip()
        if not TOKEN_PATTERN.match(token):
            raise InputError(f"trigger word {token!r} must be one lower-case word of 2-24 letters/digits, e.g. 'zqx'")
        if token in self.tokens():
            raise InputError(f"trigger word {token!r} already belongs to adapter {self.tokens()[token]!r}")
        if token in self.engine.vocabulary() and token not in self._unk_vectors:
            raise InputError(f"trigger word {token!r} is a word model {self.engine.preset.name} already knows: "
                             f"pick a new word (e.g. 'zqx') so prompts without it stay as they were")
        return token

    def check_room(self) -> None:
        """Refuse a new adapter when LDS_MAX_ADAPTERS are held (the trainer asks before training, not after)."""
        limit = self.engine.limits.max_adapters
        if len(self._adapters) >= limit:
            raise InputError(
                f"{len(self._adapters)} adapters are loaded, the limit is {limit} (LDS_MAX_ADAPTERS): remove one first"
            )

    # --- per request ------------------------------------------------------------------------------------

    def prepare(self, view, names: tuple[str, ...]):
        """Set the shared U-Net's LoRAs to the adapters `names` (what `active_for` gave this request) and return
        the view to call (caller holds engine.lock): `view` itself, or a copy whose U-Net is a full fine-tune's.
        """
        adapters = [self._adapters[n] for n in names]
        full = [a for a in adapters if a.kind == "full"]
        if full and len(adapters) > 1:
            raise InputError(f"the prompt uses adapters {', '.join(names)}: a full fine-tune ({full[0].name}) "
                             f"cannot be combined with other adapters; switch the others off or leave out their words")
        self._set_lora([a for a in adapters if a.kind == "lora"])
        if not full:
            return view
        swapped = copy.copy(view)
        swapped.register_modules(unet=full[0].unet)
        return swapped

    def _set_lora(self, adapters: list[Adapter]) -> None:
        self._apply_lora(tuple(a.name for a in adapters), tuple(a.scale for a in adapters))

    def activate_for_training(self, name: str) -> None:
        """Only the adapter being trained is on (the trainer calls this under engine.lock before every step)."""
        self._apply_lora((name,), (1.0,))

    def _apply_lora(self, names: tuple[str, ...], scales: tuple[float, ...]) -> None:
        """These LoRAs at these scales on the shared U-Net, the others off; nothing to do when already so."""
        state = (names, scales)
        if state == self._lora_state or not self._has_lora():
            self._lora_state = state
            return
        base = self.engine.base
        if names:
            base.enable_lora()
            base.set_adapters(list(names), adapter_weights=list(scales))
        else:
            base.disable_lora()
        self._lora_state = state

    def invalidate(self) -> None:
        """The U-Net's LoRA state changed behind our back (a fine-tune added or dropped layers): set it afresh
        next time."""
        self._lora_state = None

    def forget_word(self, word: str) -> None:
        """Give a word added for an unfinished fine-tune its old meaning back (unknown)."""
        if word in self._unk_vectors and word in self.engine.base.tokenizer.get_vocab():
            self._write_row(word, self._unk_vectors[word])

    def _write_row(self, word: str, vector: torch.Tensor) -> int:
        """Set the embedding row of a word the tokenizer has; returns its id."""
        embeddings = self.engine.base.text_encoder.get_input_embeddings()
        word_id = int(self.engine.base.tokenizer.convert_tokens_to_ids(word))
        with torch.no_grad():
            embeddings.weight[word_id] = vector.to(embeddings.weight)
        return word_id

    def _has_lora(self) -> bool:
        return bool(getattr(self.engine.base.unet, "_hf_peft_config_loaded", False))

    # --- adding, switching, removing --------------------------------------------------------------------

    def register(self, adapter: Adapter) -> Adapter:
        """Make an adapter (already in the U-Net, or with its own U-Net) usable by requests."""
        with self.engine.lock:
            self.check_room()
            self._adapters[adapter.name] = adapter
            self._set_word(adapter)
            self._lora_state = None
        return adapter

    def set_enabled(self, name: str, enabled: bool) -> Adapter:
        with self.engine.lock:
            adapter = self.get(name)
            adapter.enabled = bool(enabled)
            self._set_word(adapter)
            self._lora_state = None
        return adapter

    def set_scale(self, name: str, scale: float) -> Adapter:
        with self.engine.lock:
            adapter = self.get(name)
            adapter.scale = check_float("scale", scale, 0.0, 2.0)
            self._lora_state = None
        return adapter

    def remove(self, name: str) -> None:
        with self.engine.lock:
            adapter = self.get(name)
            if adapter.kind == "lora":
                self.engine.base.delete_adapters(name)
            if adapter.token_embedding is not None:
                adapter.enabled = False
                self._set_word(adapter)  # the word falls back to what it meant before (unknown)
            del self._adapters[name]
            self._lora_state = None

    def fuse(self, name: str) -> None:
        """Fold a LoRA into the U-Net weights for good and drop its layers (a preset's LCM-LoRA): no per-step cost,
        and the per-request switching never touches it. Only while it is the one LoRA loaded."""
        with self.engine.lock:
            adapter = self.get(name)
            others = [a.name for a in self._adapters.values() if a.kind == "lora" and a.name != name]
            if adapter.kind != "lora" or others:
                raise ModelError(f"cannot fuse adapter {name!r}: only a lone LoRA can be fused (others: {others})")
            self._lora_state = None
            self._set_lora([adapter])  # fusing folds in the layers' current scale: make it this adapter's
            self.engine.compute.run(self.engine.base.fuse_lora, adapter_names=[name])
            self.engine.compute.run(self.engine.base.unload_lora_weights)
            del self._adapters[name]
            self._lora_state = None

    def add_word(self, word: str, init: torch.Tensor | None = None) -> int:
        """Teach the tokenizer `word` (if it lacks it) with a new embedding row; returns its id.

        The row starts as `init` (default: the mean of the vocabulary's embeddings). Other words keep their
        ids and vectors, so prompts without the word give exactly the same images as before.
        """
        tokenizer, text_encoder = self.engine.base.tokenizer, self.engine.base.text_encoder
        with self.engine.lock:
            if not needs_new_word(tokenizer, word):
                return int(tokenizer.convert_tokens_to_ids(word))
            embeddings = text_encoder.get_input_embeddings()
            unk = tokenizer.unk_token_id
            self._unk_vectors.setdefault(word, embeddings.weight[unk].detach().clone())
            if word not in tokenizer.get_vocab():
                tokenizer.add_tokens([word])
                text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set just below
            vocabulary_mean = text_encoder.get_input_embeddings().weight[:unk].detach().mean(0)
            return self._write_row(word, init if init is not None else vocabulary_mean)

    def _set_word(self, adapter: Adapter) -> None:
        """An enabled adapter's word means its learned vector; a disabled one's what it meant before (unknown)."""
        if adapter.token_embedding is None or not adapter.token:
            return
        if adapter.token not in self.engine.base.tokenizer.get_vocab():
            self.add_word(adapter.token)
        self._write_row(
            adapter.token, adapter.token_embedding if adapter.enabled else self._unk_vectors[adapter.token]
        )

    # --- files --------------------------------------------------------------------------------------------

    def state_dict(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of an adapter in this module's file format."""
        from peft.utils import get_peft_model_state_dict

        adapter = self.get(name)
        with self.engine.lock:
            if adapter.kind == "lora":
                lora = get_peft_model_state_dict(self.engine.base.unet, adapter_name=name)
                # peft's key names ("...to_q.lora_A.weight"), which load_lora_weights reads back for every layer type
                tensors = {f"unet.{k}": v for k, v in lora.items()}
            else:
                tensors = {f"unet_full.{k}": v for k, v in adapter.unet.state_dict().items()}
            if adapter.token_embedding is not None:
                tensors["token_embedding"] = adapter.token_embedding
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        metadata = {"lds_kind": adapter.kind, "lds_token": adapter.token or "", "lds_base": self.engine.preset.name,
                    "lds_info": json.dumps(adapter.info, default=str)}
        return tensors, metadata

    def save(self, name: str, path: Path) -> Path:
        from safetensors.torch import save_file

        tensors, metadata = self.state_dict(name)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    def load_file(self, path: str | Path, *, name: str | None = None, token: str | None = None,
                  enabled: bool = True, scale: float = 1.0) -> Adapter:
        """Load a `.safetensors` adapter: this app's format or any LoRA diffusers can read (kohya, A1111, LCM-LoRA).

        `token` overrides the file's trigger word ("" or None keeps the file's; a file without one applies
        to every request while enabled); EVERY_PROMPT ("none") applies it to every request.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        name = self.check_name(name or path.stem)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"{path.name} is not a readable .safetensors file ({error})") from error
        if not tensors:
            raise InputError(f"{path.name} holds no tensors")
        if str(token or "").strip().lower() == EVERY_PROMPT:
            token = None
            tensors.pop("token_embedding", None)  # a learned word means nothing when no prompt needs the word
        else:
            token = self.check_token(token if token not in (None, "") else metadata.get("lds_token") or None)
        info = {"source": path.name, **_json_or_empty(metadata.get("lds_info"))}
        return self.load_tensors(tensors, name=name, token=token, kind=metadata.get("lds_kind"),
                                 enabled=enabled, scale=scale, info=info)

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, name: str, token: str | None, kind: str | None = None,
                     enabled: bool = True, scale: float = 1.0, info: dict | None = None) -> Adapter:
        embedding = tensors.pop("token_embedding", None)
        full = {k.removeprefix("unet_full."): v for k, v in tensors.items() if k.startswith("unet_full.")}
        kind = kind or ("full" if full else "lora")
        if kind not in KINDS:
            raise InputError(f"adapter kind {kind!r} is not one of {', '.join(KINDS)}")
        if embedding is not None and not token:
            raise InputError("the file has a learned word vector but no trigger word: give its word")
        if embedding is not None:
            hidden = self.engine.base.text_encoder.get_input_embeddings().weight.shape[1]
            if embedding.shape != (hidden,):
                raise InputError(f"the learned word vector has shape {tuple(embedding.shape)}; "
                                 f"model {self.engine.preset.name} needs ({hidden},)")
        with self.engine.lock:
            if kind == "full":
                unet = self._load_full_unet(full)
                adapter = Adapter(name=name, kind="full", token=token, enabled=enabled, unet=unet, info=info or {})
            else:
                self._load_lora(tensors, name)
                adapter = Adapter(name=name, kind="lora", token=token, enabled=enabled, scale=scale, info=info or {})
            if embedding is not None:
                self.add_word(token)
                adapter.token_embedding = embedding.to(torch.float32)
            return self.register(adapter)

    def load_source(self, source: str, *, name: str, token: str | None = None) -> Adapter:
        """A LoRA from a local file/folder or a hub id (server-side configuration only, never browser input)."""
        if Path(source).expanduser().is_file() and source.endswith(".safetensors"):
            return self.load_file(source, name=name, token=token)
        with self.engine.lock:
            try:
                self.engine.compute.run(self.engine.base.load_lora_weights, source, adapter_name=name)
            except load_errors() as error:
                raise not_available("LoRA", source, self.engine.preset.name, error) from error
            return self.register(
                Adapter(name=name, kind="lora", token=self.check_token(token), info={"source": source})
            )

    def _load_lora(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        if not all("lora" in k for k in tensors):
            odd = next(k for k in tensors if "lora" not in k)
            raise InputError(f"not a LoRA file: tensor {odd!r} is not a LoRA weight")
        dtype = self.engine.torch_dtype
        try:
            self.engine.compute.run(self.engine.base.load_lora_weights, {k: v.to(dtype) for k, v in tensors.items()},
                                    adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:
            raise InputError(f"this LoRA does not fit model {self.engine.preset.name}: {str(error)[:300]}") from error

    def _load_full_unet(self, state: dict[str, torch.Tensor]):
        unet = self.engine.compute.run(plain_unet_copy, self.engine.base.unet)
        try:
            self.engine.compute.run(
                unet.load_state_dict, {k: v.to(self.engine.torch_dtype) for k, v in state.items()}, strict=True
            )
        except RuntimeError as error:
            raise InputError(f"this U-Net does not fit model {self.engine.preset.name}: {str(error)[:300]}") from error
        return unet.eval().requires_grad_(False)


def plain_unet_copy(unet):
    """A copy of the shared U-Net without any LoRA layers (a full fine-tune starts from, and replaces, the base)."""
    unet = copy.deepcopy(unet)
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.unload_lora()  # unmerged LoRA layers are dropped, leaving the base weights
    return unet


def needs_new_word(tokenizer, word: str) -> bool:
    """True where the tokenizer cannot spell `word` (a word-level vocabulary lacks it), or where an adapter
    added it earlier (its vector is then the adapter's to set). A lookup, never an encode
    (see pipelines.world.text.unknown_words)."""
    if tokenizer.unk_token_id is None or not is_word_level(tokenizer):
        return False  # byte-level BPE spells any word; DreamBooth then trains on the word's usual tokens
    return word in tokenizer.get_added_vocab() or word not in tokenizer.get_vocab()


def _json_or_empty(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
