"""Reading transformers-layout checkpoints: safetensors (single or sharded) and a content fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FINGERPRINT_PROGRESS_BYTES = 256 << 20  # show a progress bar when hashing more than this


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} (or fp32/fp16/bf16)")
    return DTYPES[name]


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files: the shards named by model.safetensors.index.json, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shards named by the index are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are read)")
    return files


def tensor_names(model_dir: str | Path) -> list[str]:
    names = []
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def load_tensors(model_dir: str | Path, wanted: Callable[[str], bool], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor whose name `wanted` accepts, cast to `dtype` when given."""
    tensors = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if wanted(name):
                    t = f.get_tensor(name)
                    tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return tensors


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files: two bundles match only if cut from the same bytes."""
    model_dir = Path(model_dir)
    files = [model_dir / "config.json"] + safetensors_files(model_dir)
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint", disable=total < _FINGERPRINT_PROGRESS_BYTES) as bar:
        for f in files:
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()
