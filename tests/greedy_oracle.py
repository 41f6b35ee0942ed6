"""transformers' greedy generate as the oracle of split generation, with float32 near-ties excused."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

TIE = 1e-4  # logits closer than this are a tie in float32 (the runtime matches transformers to ~1e-5)

_HF: dict = {}
_GREEDY: dict = {}  # (model folder, prompt ids, max_new_tokens) -> transformers' greedy tokens


def hf_model(model_dir):
    if str(model_dir) not in _HF:
        _HF[str(model_dir)] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF[str(model_dir)]


@torch.no_grad()
def hf_greedy(model_dir, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy new tokens (it stops early at an end-of-sequence id, which it keeps); computed once per
    session for each (model, prompt, length): tests of several splits ask for the same ones."""
    key = (str(model_dir), tuple(ids), max_new_tokens)
    if key not in _GREEDY:
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = hf_model(model_dir).generate(torch.tensor([ids]), attention_mask=mask, do_sample=False,
                                           max_new_tokens=max_new_tokens)
        _GREEDY[key] = tuple(out[0, len(ids):].tolist())
    return list(_GREEDY[key])


@torch.no_grad()
def assert_same_greedy(model_dir, ids: list[int], got: list[int], expected: list[int]) -> None:
    """got == expected, except that a divergence at a genuine float32 near-tie (transformers' logits of the
    two tokens within TIE) ends the comparison: summation order may pick either token there."""
    if got != expected:
        i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if i is not None:
            logits = hf_model(model_dir)(torch.tensor([ids + expected[:i]])).logits[0, -1]
            if float(logits[expected[i]] - logits[got[i]]) < TIE:
                return
        assert got == expected, f"prompt of {len(ids)} tokens; first difference at new token {i}"
