"""How a missing model is told apart from a broken one, and what the message says: shared by everything that
loads weights (the engine, adapters, the safety checker)."""
from __future__ import annotations

from pathlib import Path

from pipelines.common import ModelNotAvailable

DOWNLOAD_HINT = "python app.py --download {name}"


def is_local(path_or_id: str) -> bool:
    return Path(path_or_id).expanduser().exists()


def not_available(what: str, model_id: str, preset_name: str, error: BaseException) -> ModelNotAvailable:
    """The error for weights that could not be loaded: a local path names the cause, a hub id how to fetch it."""
    if is_local(model_id) or model_id.startswith(("/", ".")):
        return ModelNotAvailable(f"{what} at {model_id} could not be loaded ({type(error).__name__}: {error})")
    return ModelNotAvailable(
        f"{what} '{model_id}' is not in the local Hugging Face cache and cannot be downloaded now "
        f"({type(error).__name__}). Pre-download it on a machine with internet access: "
        f"`{DOWNLOAD_HINT.format(name=preset_name)}` (or `hf download {model_id}`)."
    )


def load_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "weights missing / hub unreachable"."""
    # OSError covers diffusers' and transformers' "can't find ... in the cache" messages; huggingface_hub's
    # own errors cover offline mode and 404s.
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (OSError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, EnvironmentError)
