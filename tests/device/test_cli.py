"""The `hat` command line as a user runs it: real subprocesses for split, cloud serve, generate and demo.

Every `hat` process pays several seconds of torch/transformers imports, so processes that do not depend
on each other run at the same time (the demo starts before the first test), one cloud process serves
every test that needs one (the last of them stops it with SIGTERM), and most refusals run `hat`'s
main() in this process; one refusal (another checkpoint's bundle) runs as a real process to check the
exit status and stderr end to end.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import TOKENIZER_TEXT, make_checkpoint
from hat.cli.demo_cmd import DEMO_QUESTION
from hat.cli.main import main
from hat.common.split import TOKENIZER_FILES, split_checkpoint

FAMILY = "llama3"
K, M, NUM_LAYERS, HIDDEN = 2, 1, 6, 64
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 12
READY_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 180.0  # generous: other test runs share this machine's cores

_script = Path(sys.executable).with_name("hat")
HAT = [str(_script)] if _script.is_file() else [sys.executable, "-m", "hat.cli.main"]


def start(*args, env: dict | None = None, **popen) -> subprocess.Popen:
    """`hat ARGS` in the background; several run at once, so each keeps to one compute thread."""
    kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([*HAT, *map(str, args)], env=env, **{**kwargs, **popen})


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for a `start`ed process: (exit code, stdout, stderr); a second call returns the same."""
    if hasattr(proc, "hat_result"):
        return proc.hat_result
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    proc.hat_result = proc.returncode, out, err
    return proc.hat_result


def hat_main(capsys, *args) -> tuple[int, str, str]:
    """`hat ARGS` in this process (the same entry point the console script calls), for the error paths,
    which would otherwise each pay a process's imports."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(result: tuple[int, str, str], command: str, *words: str) -> str:
    """Exit code 2, no traceback, and exactly one `hat COMMAND: error: ...` line naming the problem."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.startswith(f"hat {command}: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="module", autouse=True)
def launched(model_dir, work):
    """`hat demo` and the good `hat split` start before the first test and run alongside the in-process ones."""
    procs = {
        "demo": start("demo", "--model", model_dir, "--max-new-tokens", 8,
                      stderr=subprocess.STDOUT),
        "split": start("split", model_dir, "--input-layers", K, "--output-layers", M, "--out", work / "B"),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def bundle(launched, work) -> Path:
    """`hat split MODEL --input-layers 2 --output-layers 1 --out B` -> B (B/device, B/cloud)."""
    rc, out, err = finish(launched["split"])
    assert rc == 0, err
    assert "device bundle:" in out and "cloud bundle:" in out
    return work / "B"


class CloudProcess:
    def __init__(self, bundle_dir: Path):
        self.proc = start("cloud", "serve", "--bundle", bundle_dir / "cloud", "--data", "tcp://127.0.0.1:0",
                          "--control", "127.0.0.1:0", "--threads", 1, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> tuple[int, int]:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no ready line from the cloud within {timeout} s:\n{''.join(self.lines)}")
            if line is None:
                pytest.fail(f"the cloud exited ({self.proc.wait()}) before it was ready:\n{''.join(self.lines)}")
            match = re.match(r"ready data=tcp://127\.0\.0\.1:(\d+) control=127\.0\.0\.1:(\d+) layers=\[(\d+),(\d+)\)",
                             line)
            if match:
                assert (int(match.group(3)), int(match.group(4))) == (K, NUM_LAYERS - M)
                return int(match.group(1)), int(match.group(2))

    def output(self) -> str:
        self._reader.join(timeout=10)
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def serving(bundle):
    """A ready `hat cloud serve` process for `bundle` (its ports in `.ports`), killed on exit."""
    server = CloudProcess(bundle)
    try:
        server.ports = server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cloud(bundle):
    with serving(bundle) as server:
        yield server


def generate(cloud: CloudProcess, device_bundle: Path, prompt: str, *extra) -> subprocess.Popen:
    data_port, control_port = cloud.ports
    return start("generate", "--bundle", device_bundle, "--cloud", "127.0.0.1", "--data-port", data_port,
                 "--control-port", control_port, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS,
                 "--threads", 1, "--timeout", 60, *extra)


@torch.no_grad()
def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------------ split


def test_split_refuses_no_input_layer(model_dir, work, capsys):
    assert_usage_error(hat_main(capsys, "split", model_dir, "--input-layers", 0, "--output-layers", M,
                                "--out", work / "x1"), "split", "--input-layers")


def test_split_refuses_no_cloud_layer(model_dir, work, capsys):
    assert_usage_error(hat_main(capsys, "split", model_dir, "--input-layers", 3, "--output-layers", 3,
                                "--out", work / "x2"), "split", "no layer for the cloud", "6 layers")


def test_split_refuses_missing_folder(work, capsys):
    assert_usage_error(hat_main(capsys, "split", work / "no-such-model", "--input-layers", K, "--output-layers", M,
                                "--out", work / "x3"), "split", "no-such-model")


def tensor_names(bundle_dir: Path) -> set[str]:
    with safe_open(str(bundle_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_split_writes_device_and_cloud_bundles(bundle, model_dir):
    device, cloud = bundle / "device", bundle / "cloud"

    cloud_names = tensor_names(cloud)
    assert cloud_names and all(n.startswith("model.layers.") for n in cloud_names)
    assert {int(n.split(".")[2]) for n in cloud_names} == set(range(K, NUM_LAYERS - M))
    assert not {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} & cloud_names
    assert not [name for name in TOKENIZER_FILES if (cloud / name).exists()]
    assert sorted(p.name for p in cloud.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]

    device_names = tensor_names(device)
    layers = {int(n.split(".")[2]) for n in device_names if n.startswith("model.layers.")}
    assert layers == {0, 1, NUM_LAYERS - 1}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= device_names
    assert (device / "tokenizer.json").is_file()

    # the two halves are exactly the checkpoint, cut in two
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == device_names | cloud_names
    assert not device_names & cloud_names

    dm, cm = (json.loads((b / "manifest.json").read_text()) for b in (device, cloud))
    assert (dm.pop("part"), cm.pop("part")) == ("device", "cloud")
    assert dm == cm
    assert (dm["num_layers"], dm["input_layers"], dm["output_layers"], dm["hidden_size"]) == (NUM_LAYERS, K, M, HIDDEN)


# --------------------------------------------------------------------------------- cloud + generate


@pytest.fixture(scope="module")
def generate_runs(cloud, bundle, work) -> dict[str, subprocess.Popen]:
    """Two `hat generate` runs against the shared cloud, started together."""
    other = make_checkpoint(FAMILY, work / "other-model", seed=1)
    other_device, _ = split_checkpoint(other, K, M, work / "other-bundle")
    procs = {
        "json": generate(cloud, bundle / "device", PROMPT, "--json"),
        "other_checkpoint": generate(cloud, other_device, PROMPT),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_generate_json_matches_transformers(generate_runs, model_dir):
    expected = hf_greedy(model_dir, PROMPT, NEW_TOKENS)
    rc, out, err = finish(generate_runs["json"])
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("token_ids", "text", "ttft_ms", "tbt_ms", "bytes_up", "bytes_down"):
        assert key in result, key
    ids = result["token_ids"]
    assert ids == expected
    assert result["text"] == AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)
    assert result["finish_reason"] == ("stop" if ids[-1] == 2 else "length")
    assert 0 < result["ttft_ms"] < RUN_TIMEOUT_S * 1000
    assert len(result["tbt_ms"]) == len(ids) - 1 and all(t >= 0 for t in result["tbt_ms"])
    # hidden states cross as float32 both ways (with M > 0 the cloud returns every position)
    positions = result["prompt_tokens"] + len(ids) - 1
    for key in ("bytes_up", "bytes_down"):
        assert positions * HIDDEN * 4 <= result[key] < positions * HIDDEN * 4 + 1000 * (len(ids) + 2), key


def test_generate_refuses_a_bundle_of_another_checkpoint(generate_runs):
    line = assert_usage_error(finish(generate_runs["other_checkpoint"]), "generate", "refused")
    assert "checkpoint" in line and "same checkpoint" in line


def generate_in_process(capsys, cloud: CloudProcess, device_bundle: Path, prompt: str, max_new_tokens: int):
    data_port, control_port = cloud.ports
    return hat_main(capsys, "generate", "--bundle", device_bundle, "--cloud", "127.0.0.1", "--data-port", data_port,
                    "--control-port", control_port, "--prompt", prompt, "--max-new-tokens", max_new_tokens)


def test_generate_refuses_a_prompt_longer_than_the_context(cloud, bundle, capsys):
    line = assert_usage_error(generate_in_process(capsys, cloud, bundle / "device", TOKENIZER_TEXT, 4),
                              "generate", "context")
    assert "256" in line and "tokens" in line


def test_generate_refuses_the_cloud_bundle_and_no_new_tokens(cloud, bundle, capsys):
    assert_usage_error(generate_in_process(capsys, cloud, bundle / "cloud", PROMPT, 4), "generate",
                       "cloud bundle", "expected a device bundle")
    assert_usage_error(generate_in_process(capsys, cloud, bundle / "device", PROMPT, 0), "generate",
                       "max_new_tokens")


def test_cloud_stops_on_sigterm(cloud, generate_runs):
    """Last test of the module that uses the cloud: the shared cloud goes away."""
    for proc in generate_runs.values():
        finish(proc)
    cloud.proc.send_signal(signal.SIGTERM)
    assert cloud.proc.wait(timeout=15) == 0
    assert "stopped" in cloud.output().splitlines()[-1]


# ------------------------------------------------------------------------------------------ demo


def test_demo(launched):
    rc, out, _ = finish(launched["demo"])
    assert rc == 0, out
    assert f"prompt: {DEMO_QUESTION!r} (greedy)" in out  # a model other than the reference one is asked a question
    summary = [line for line in out.splitlines() if "first token" in line]
    assert len(summary) == 1, out
    assert re.search(r"\[\d+ tokens \((length|stop)\) from a \d+-token prompt in \d+ chunks? \((adaptive|fixed|none)"
                     r"(, \d+ re-plans)?\): first token \d+ ms \(predicted \d+\)", summary[0]), summary[0]
