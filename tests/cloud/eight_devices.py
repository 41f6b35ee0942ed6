"""Eight emulated devices for the cloud's concurrency tests: their models, prompts, a way to run them at once,
and the oracle their outputs are checked against (transformers' greedy generate)."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from checkpoints import TOKENIZER_TEXT
from hat.common.bundle import load_manifest
from hat.device.cloud_link import CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.speculation import SpeculationConfig

_DEVICE_TESTS = str(Path(__file__).resolve().parents[1] / "device")
if _DEVICE_TESTS not in sys.path:
    sys.path.insert(0, _DEVICE_TESTS)

from test_speculative import device_with_adapter  # noqa: E402

FAMILY, K, M = "llama_tied_bias", 2, 1
PROMPT_LENGTHS = [5, 12, 19, 27, 35, 44, 52, 60]  # one per device
NEW_TOKENS = 16
SPECULATION = SpeculationConfig(threshold=0.0, max_draft=4, length="threshold")  # threshold 0: drafts are always made
JOIN_TIMEOUT_S = 90.0


def load_eight_devices(model_dir: Path, work: Path) -> tuple[list[DeviceModel], list[list[int]]]:
    """Eight device models (with a random draft adapter) and each one's prompt ids."""
    first = device_with_adapter(model_dir, K, M, work)
    models = [first] + [DeviceModel.load(work / "spec-bundle" / "device") for _ in PROMPT_LENGTHS[1:]]
    assert all(m.adapter is not None for m in models)
    all_ids = first.tokenizer(TOKENIZER_TEXT)["input_ids"]
    prompts = [all_ids[7 * i:7 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]
    assert [len(p) for p in prompts] == PROMPT_LENGTHS
    return models, prompts


def reference_tokens(model_dir, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (stopping at its end-of-sequence token as devices do)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            out.append(model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=model.config.eos_token_id)[0, len(ids):].tolist())
    return out


def run_concurrently(gens, prompts, alongside=None, new_tokens: int = NEW_TOKENS) -> list:
    """Every generator on its own thread, released together; the results (or the exception raised) in order.
    `alongside`: a function run on a thread of its own from the moment the generators are released."""
    results: list = [None] * len(gens)
    barrier = threading.Barrier(len(gens) + 1)

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = gens[i].generate_ids(prompts[i], new_tokens)
        except BaseException as exc:  # surfaced in the main thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(gens))]
    for t in threads:
        t.start()
    barrier.wait(30)
    helper = threading.Thread(target=alongside, daemon=True) if alongside else None
    if helper is not None:
        helper.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    if helper is not None:
        helper.join(5)
    assert not any(t.is_alive() for t in threads), "a device did not finish"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def slow_rounds(link: CloudLink, delay_s: float = 0.01, gate: threading.Event | None = None) -> None:
    """Make every reply the link receives come `delay_s` later, so sessions are surely mid-run when a test acts;
    with `gate`, each receive also waits while the gate is closed (the test holds the devices between rounds)."""
    honest = link.receive

    def receive(*args, **kwargs):
        if gate is not None and not gate.wait(JOIN_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        time.sleep(delay_s)
        return honest(*args, **kwargs)

    link.receive = receive


def registered_link(cluster_or_ports, device_dir, device_id: str) -> CloudLink:
    data_port, control_port = cluster_or_ports
    link = CloudLink(LinkConfig(host="127.0.0.1", data_port=data_port, control_port=control_port,
                                device_id=device_id, reply_timeout_s=10.0, admission_timeout_s=5.0))
    link.register(load_manifest(device_dir, part="device"))
    return link
