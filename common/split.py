"""`hat split`: cut a checkpoint into a device bundle and a cloud bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .token_frequencies import FREQUENCY_TABLE
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, AdapterMismatchError
from .bundle import BundleManifest
from .checkpoint import DTYPE_NAMES, fingerprint, load_tensors, parse_dtype
from .model_part import EMBED, LM_HEAD, NORM, layer_index
from .model_spec import load_model_spec
from .model_store import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def validate_split(num_layers: int, input_layers: int, output_layers: int) -> None:
    if input_layers < 1:
        raise ValueError("--input-layers must be at least 1: with no input layer the uplink would carry raw "
                         "token embeddings, which give the tokens away")
    if output_layers < 0:
        raise ValueError("--output-layers must be 0 or more")
    if input_layers + output_layers >= num_layers:
        raise ValueError(f"--input-layers {input_layers} + --output-layers {output_layers} leaves no layer for the "
                         f"cloud: the model has {num_layers} layers")


def default_adapter_dir(model_dir: str | Path, input_layers: int, output_layers: int) -> Path:
    """Where a checkpoint keeps the draft adapter it ships for a split: MODEL/adapters/k{K}-m{M}."""
    return Path(model_dir) / "adapters" / f"k{input_layers}-m{output_layers}"


def split_checkpoint(model_dir: str | Path, input_layers: int, output_layers: int, out: str | Path,
                     dtype: str | None = None, adapter: str | Path | None = None) -> tuple[Path, Path]:
    """Write OUT/device and OUT/cloud; returns their paths. The device bundle carries the draft adapter
    `adapter` (default: the checkpoint's own for this split, when it ships one) under OUT/device/adapter."""
    model_dir, out = resolve_model(model_dir), Path(out)
    spec = load_model_spec(model_dir)
    n = spec.num_layers
    validate_split(n, input_layers, output_layers)
    torch_dtype = parse_dtype(dtype) if dtype else None
    first_out = n - output_layers

    def on_device(name: str) -> bool:
        layer = layer_index(name)
        return layer is None or layer < input_layers or layer >= first_out

    device_tensors = load_tensors(model_dir, on_device, torch_dtype)
    if LM_HEAD not in device_tensors and not spec.tie_word_embeddings:
        raise ValueError(f"{model_dir} has no {LM_HEAD} and does not tie its embeddings")
    for required in (EMBED, NORM):
        if required not in device_tensors:
            raise ValueError(f"{model_dir} lacks {required}")
    cloud_tensors = load_tensors(model_dir, lambda name: not on_device(name), torch_dtype)
    stored = next(iter(cloud_tensors.values())).dtype
    source = fingerprint(model_dir)
    if adapter is None and (default_adapter_dir(model_dir, input_layers, output_layers) / ADAPTER_CONFIG).is_file():
        adapter = default_adapter_dir(model_dir, input_layers, output_layers)
    if adapter is not None:
        try:
            AdapterConfig.load(adapter).check_matches(source, input_layers, output_layers)
        except AdapterMismatchError as exc:
            raise AdapterMismatchError(f"adapter {adapter}: {exc}") from None
    config = json.loads((model_dir / "config.json").read_text())
    paths = []
    for part, tensors in (("device", device_tensors), ("cloud", cloud_tensors)):
        target = out / part
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
        (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if part == "device":
            for name in TOKENIZER_FILES:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, target / name)
            if adapter is not None:
                (target / "adapter").mkdir()
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    shutil.copy2(Path(adapter) / name, target / "adapter" / name)
                if (Path(adapter) / FREQUENCY_TABLE).is_file():  # the reduced draft head's token frequencies
                    shutil.copy2(Path(adapter) / FREQUENCY_TABLE, target / "adapter" / FREQUENCY_TABLE)
        BundleManifest(part=part, model_type=spec.model_type, num_layers=n, input_layers=input_layers,
                       output_layers=output_layers, hidden_size=spec.hidden_size, dtype=DTYPE_NAMES[stored],
                       source_fingerprint=source, source_name=model_dir.name).save(target)
        paths.append(target)
    return paths[0], paths[1]
