"""The project's default model: the trained reference model shipped inside the package."""
from __future__ import annotations

from pathlib import Path

REFERENCE_MODEL_DIR = Path(__file__).resolve().parent / "reference_model"
DEFAULT_INPUT_LAYERS = 2  # K: the device runs layers [0, 2) before the cloud
DEFAULT_OUTPUT_LAYERS = 1  # M: the device runs the last layer after the cloud


def reference_model_dir() -> Path:
    """Where the reference checkpoint (config.json, model.safetensors, tokenizer, MODEL_CARD.md) lies."""
    if not (REFERENCE_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the reference model is missing from {REFERENCE_MODEL_DIR}: the package was installed "
                                "without its data, or `scripts/train_reference_model.py` has not been run")
    return REFERENCE_MODEL_DIR
