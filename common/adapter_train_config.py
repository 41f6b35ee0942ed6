"""`hat train-adapter`'s settings (no torch import: the CLI reads the defaults when it builds its parser)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdapterTrainConfig:
    model_dir: str  # the full checkpoint (the teacher)
    input_layers: int  # K of the split the adapter serves
    output_layers: int  # M of that split
    out: str  # adapter folder to write (checkpoint.pt there makes the run resumable)
    width: int = 0  # adapter layer width; 0 = the model's hidden size
    depth: int = 1  # adapter decoder layers
    intermediate_size: int = 0  # adapter MLP width; 0 = the model's
    steps: int = 400  # optimizer steps
    batch_size: int = 8  # windows per step
    seq_len: int = 256  # tokens per window
    lr: float = 2e-3  # peak learning rate (linear warmup, cosine to lr/10)
    warmup_steps: int = 30  # warmup length in steps
    ce_weight: float = 0.1  # weight of the cross-entropy to the teacher's distribution
    seed: int = 0  # data order, initialisation
    data: list[str] = field(default_factory=list)  # text files or folders (*.py, *.txt, *.md); empty = the stdlib corpus
    eval_every: int = 100  # steps between held-out evaluations
    eval_windows: int = 16  # held-out windows for top-1 agreement
    eval_chains: int = 24  # held-out prefixes for the draft-chain acceptance measure
    draft_len: int = 8  # longest greedy draft chain in that measure
    ckpt_every: int = 50  # steps between resumable checkpoints
    resume: bool = False  # continue from OUT/checkpoint.pt
    cache: str = ""  # hidden-state cache folder (hat.common.hidden_cache): the teacher's middle runs once per token
    # and training runs epochs over it; "" = the teacher runs on every step's windows
    cache_tokens: int = 1_000_000  # training tokens the cache holds (with cache)
    ce_vocab: int = 0  # the cross-entropy term scores only the N most frequent training tokens (0 = the full vocabulary)
    save_dtype: str = "float32"  # dtype of the written adapter weights (bfloat16 halves the file)
    conditioning: str = "input"  # the adapter's AdapterConfig.conditioning: "input", or "verified" (it also sees the
    # middle output of the position before: the teacher's in training, zeros at a window's first position)
    feature_noise: float = 0.0  # verified: Gaussian noise on that previous middle output, as a fraction of its RMS
    # per position (EAGLE's way of readying the adapter for its own, inexact estimates deeper in a draft)
    second_step_weight: float = 0.0  # verified: weight of a second pass whose previous middle outputs are the
    # adapter's own first-pass estimates (what draft tokens after a round's first see); 0 = no second pass
