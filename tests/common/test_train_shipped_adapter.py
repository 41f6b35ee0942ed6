"""scripts/train_shipped_adapter.py: the recipe's conditioning reaches hat train-adapter's settings, and the adapter
card says what the adapter is conditioned on and which command made it; the recipe is the shipped adapter's."""
from __future__ import annotations

from dataclasses import asdict, fields

from hat.common.adapter_train_config import AdapterTrainConfig
from script_loader import load_script

shipped = load_script("train_shipped_adapter")


def summary(conditioning: str) -> dict:
    adapter = dict(input_layers=2, output_layers=1, width=576, depth=1, intermediate_size=1536,
                   source_fingerprint="f" * 64, confidence_temperature=0.5, format_version=1)
    if conditioning != "input":
        adapter |= dict(conditioning=conditioning, format_version=2)
    final = dict(top1_agreement=0.3, top2_coverage=0.4, top4_coverage=0.5, accept_len=1.5, accepted_at_depth=[0.3] * 8)
    train = asdict(AdapterTrainConfig("m", 2, 1, "o", conditioning=conditioning, second_step_weight=0.5
                                      if conditioning != "input" else 0.0))
    return dict(adapter=adapter, train_config=train, final=final, parameters=1000, data="d", distinct_tokens=10,
                epochs=1.0, tokens_seen=10, train_s=1.0, cache_fill_s=0.0, threads=1,
                calibration=dict(confidence_temperature=0.5, log_loss=0.4, log_loss_at_1=0.5))


class Table:
    source = "counted"

    @staticmethod
    def coverage(n: int) -> float:
        return 0.5


def test_every_recipe_field_is_a_train_adapter_setting():
    assert {f.name for f in fields(shipped.Recipe)} <= {f.name for f in fields(AdapterTrainConfig)}


def test_the_recipe_is_the_shipped_adapters():
    """The recipe's conditioning is the one the shipped SmolLM2 adapter was trained with (its config says)."""
    import json

    from hat.common.shipped_adapters import shipped_adapters

    (folder,) = shipped_adapters("smollm2-135m-instruct")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config.get("conditioning", "input") == shipped.RECIPE.conditioning == "verified"


def test_the_card_names_the_conditioning():
    plain = shipped.card("smollm2-135m-instruct", "k2-m1", summary("input"), Table(), 1.0)
    assert "Conditioning: input only" in plain and "--conditioning" not in plain
    verified = shipped.card("smollm2-135m-instruct", "k2-m1", summary("verified"), Table(), 1.0)
    assert "Conditioning: verified" in verified and "second-step weight 0.5" in verified
    assert "-K 2 -M 1 --conditioning verified --second-step-weight 0.5`" in verified
