"""Speculative decoding from the command line: `hat split --adapter`, `hat generate` with and without
speculation against a real `hat cloud serve` process, and `hat train-adapter`.

Every `hat` process pays seconds of torch/transformers imports, so only two run as real processes: the
cloud, and one speculative `hat generate --json` (exit status and stdout end to end). Everything else runs
`hat`'s main() in this process, with the same arguments a user would type.

The checkpoint is a copy of the tiny llama3 one whose middle layers [K, N-M) have their attention and
MLP output projections zeroed: the middle adds nothing, so an adapter's estimate is close to the truth and
a random adapter (a small random projection) drafts chains that are mostly, but not always, accepted.
That exercises both verification outcomes, and greedy speculative output must equal plain greedy output.
"""
from __future__ import annotations

import contextlib
import filecmp
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import TOKENIZER_TEXT
from test_cli import CloudProcess, assert_usage_error, finish, hat_main, serving, start
from hat.cli.main import build_parser, main
from hat.common.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterConfig, DraftAdapter
from hat.common.checkpoint import fingerprint
from hat.common.model_spec import load_model_spec

FAMILY = "llama3"
K, M, NUM_LAYERS = 2, 1, 6
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 24
JSON_KEYS = ("token_ids", "text", "speculative", "accept_len", "rounds", "draft_ms", "drafted_tokens",
             "wasted_draft_tokens", "predraft_reused_tokens")

@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """In-process `hat generate --threads 1` sets torch's thread count for the whole test process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speculation-cli")


@pytest.fixture(scope="module")
def model(tiny_checkpoint, work) -> Path:
    """A copy of the tiny checkpoint whose middle layers return their input (see the module docstring)."""
    out = work / "model"
    shutil.copytree(tiny_checkpoint(FAMILY), out)
    tensors = load_file(str(out / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    for layer in range(K, NUM_LAYERS - M):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            tensors[f"model.layers.{layer}.{name}"].zero_()
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    return out


def save_random_adapter(model_dir: Path, folder: Path, seed: int, **changes) -> Path:
    """An adapter with a small random projection (an untrained one passes h_K through unchanged)."""
    spec = load_model_spec(model_dir)
    config = AdapterConfig(input_layers=K, output_layers=M, width=spec.hidden_size, depth=1,
                           intermediate_size=spec.intermediate_size, source_fingerprint=fingerprint(model_dir))
    torch.manual_seed(seed)
    adapter = DraftAdapter(spec, replace(config, **changes))
    with torch.no_grad():
        adapter.project.weight.normal_(std=0.05)
    adapter.save(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(model, work) -> Path:
    return save_random_adapter(model, work / "adapter", seed=0)


@pytest.fixture(scope="module")
def split_run(model, adapter, work) -> tuple[int, str, Path]:
    """`hat split MODEL -K 2 -M 1 --out B --adapter ADAPTER`, in this process: (exit code, stdout, B)."""
    out = work / "B"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["split", str(model), "-K", str(K), "-M", str(M), "--out", str(out), "--adapter", str(adapter)])
    return rc, buffer.getvalue(), out


@pytest.fixture(scope="module")
def bundle(split_run) -> Path:
    rc, out, path = split_run
    assert rc == 0, out
    return path


@pytest.fixture(scope="module")
def cloud(bundle):
    with serving(bundle) as server:
        yield server


def generate_args(cloud: CloudProcess, device_bundle: Path, *extra) -> list:
    data_port, control_port = cloud.ports
    return ["generate", "--bundle", device_bundle, "--cloud", "127.0.0.1", "--data-port", data_port,
            "--control-port", control_port, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--threads", 1,
            "--timeout", 60, "--json", *extra]


@pytest.fixture(scope="module")
def speculative_process(cloud, bundle):
    """`hat generate --json --draft-threshold 0` as a real process, started as soon as the cloud is up."""
    proc = start(*generate_args(cloud, bundle / "device", "--draft-threshold", 0))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def generate_json(capsys, cloud, device_bundle: Path, *extra) -> dict:
    rc, out, err = hat_main(capsys, *generate_args(cloud, device_bundle, *extra))
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(cloud, bundle) -> dict:
    """`hat generate --json --no-speculation` in this process (capsys is per test, so stdout is redirected)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main([str(a) for a in generate_args(cloud, bundle / "device", "--no-speculation")])
    assert rc == 0
    return json.loads(buffer.getvalue().strip().splitlines()[-1])


@torch.no_grad()
def hf_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(ids):].tolist()


def check_accounting(result: dict) -> None:
    """Each decode round adds accepted + 1 tokens to the one the prompt round gave."""
    ids = result["token_ids"]
    assert result["rounds"] >= 1 and 0 < len(ids) <= NEW_TOKENS
    if result["finish_reason"] == "length":
        assert len(ids) == NEW_TOKENS
        assert result["accept_len"] * result["rounds"] == pytest.approx(len(ids) - 1, abs=1e-3)


# ------------------------------------------------------------------------------------------ split


def test_split_copies_the_adapter(split_run, adapter):
    rc, out, bundle = split_run
    assert rc == 0, out
    assert "device bundle carries" in out and "draft adapter" in out and "no draft adapter" not in out, out
    copied = bundle / "device" / "adapter"
    assert sorted(p.name for p in copied.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert filecmp.cmp(adapter / name, copied / name, shallow=False), name
    assert not (bundle / "cloud" / "adapter").exists()


def test_split_refuses_an_adapter_for_another_split(model, work, capsys):
    other_split = save_random_adapter(model, work / "adapter-k3", seed=0, input_layers=3)
    line = assert_usage_error(hat_main(capsys, "split", model, "-K", K, "-M", M, "--out", work / "x1",
                                       "--adapter", other_split), "split", "K=3, M=1", f"K={K}, M={M}")
    assert "the adapter is for" in line
    assert not (work / "x1").exists()  # refused before anything was written


def test_split_refuses_an_adapter_of_another_checkpoint(model, tiny_checkpoint, work, capsys):
    original = tiny_checkpoint(FAMILY)  # the unmodified checkpoint: other weights, another fingerprint
    other = save_random_adapter(original, work / "adapter-other", seed=0)
    line = assert_usage_error(hat_main(capsys, "split", model, "-K", K, "-M", M, "--out", work / "x2",
                                       "--adapter", other), "split", "distilled from checkpoint",
                              fingerprint(original)[:12])
    assert fingerprint(model)[:12] in line
    assert not (work / "x2").exists()
    assert_usage_error(hat_main(capsys, "split", model, "-K", K, "-M", M, "--out", work / "x3",
                                "--adapter", work), "split", "is not an adapter")


def test_split_copies_the_adapter_the_checkpoint_ships(model, adapter, work, capsys):
    shipped = work / "model-with-adapter"
    shutil.copytree(model, shipped)
    shutil.copytree(adapter, shipped / "adapters" / f"k{K}-m{M}")
    assert fingerprint(shipped) == fingerprint(model)  # an adapters/ folder does not change the fingerprint

    rc, out, err = hat_main(capsys, "split", shipped, "-K", K, "-M", M, "--out", work / "S1")
    assert rc == 0, err
    assert "no draft adapter" not in out and "draft adapter" in out, out
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert filecmp.cmp(adapter / name, work / "S1" / "device" / "adapter" / name, shallow=False), name

    # an explicit --adapter wins over the shipped one
    explicit = save_random_adapter(model, work / "adapter-seed1", seed=1)
    rc, out, err = hat_main(capsys, "split", shipped, "-K", K, "-M", M, "--out", work / "S2", "--adapter", explicit)
    assert rc == 0, err
    assert filecmp.cmp(explicit / ADAPTER_WEIGHTS, work / "S2" / "device" / "adapter" / ADAPTER_WEIGHTS,
                       shallow=False)

    # no adapter shipped for this split: none copied, and the output says so
    rc, out, err = hat_main(capsys, "split", shipped, "-K", 3, "-M", M, "--out", work / "S3")
    assert rc == 0, err
    assert "no draft adapter" in out, out
    assert not (work / "S3" / "device" / "adapter").exists()


# --------------------------------------------------------------------------------------- generate


def test_generate_flag_defaults_are_the_speculation_config_defaults():
    from hat.device.speculation import SpeculationConfig

    args = build_parser().parse_args(["generate", "--bundle", "B", "--cloud", "h", "--prompt", "p"])
    defaults = SpeculationConfig()
    assert (args.draft_threshold, args.max_draft) == (defaults.threshold, defaults.max_draft)
    assert not args.no_speculation and not args.no_parallel_draft


def test_draft_length_and_vocabulary_flags():
    from types import SimpleNamespace

    from hat.cli.generate_cmd import speculation_config

    base = ["generate", "--bundle", "B", "--cloud", "h", "--prompt", "p"]
    model = SimpleNamespace(adapter=object())

    def config(*flags):
        return speculation_config(build_parser().parse_args(base + list(flags)), model)

    assert (config().length, config().draft_vocab) == ("cost", 0)
    assert config("--draft-threshold", "0.3").length == "threshold"  # a threshold asked for is a threshold used
    assert config("--draft-length", "cost", "--draft-threshold", "0.3").length == "cost"
    assert config("--draft-length", "threshold").length == "threshold"
    assert config("--draft-vocab", "4096").draft_vocab == 4096


def test_generate_without_speculation(plain, speculative_process, model):
    """(Requests speculative_process so that the real process runs alongside the in-process generations.)"""
    assert plain["speculative"] is False
    assert plain["accept_len"] == 1.0
    assert plain["rounds"] == len(plain["token_ids"]) - 1
    assert (plain["draft_ms"], plain["drafted_tokens"], plain["wasted_draft_tokens"]) == (0, 0, 0)
    check_accounting(plain)
    assert plain["token_ids"] == hf_greedy(model, PROMPT, NEW_TOKENS)


def test_generate_with_default_speculation_settings(plain, cloud, bundle, capsys):
    """No speculation flags at all: the bundle's adapter is used with the default threshold and draft length."""
    result = generate_json(capsys, cloud, bundle / "device")
    assert result["speculative"] is True
    assert result["token_ids"] == plain["token_ids"]
    check_accounting(result)


def test_generate_with_predrafting_over_a_slow_link(plain, cloud, bundle, capsys, monkeypatch):
    """Slow replies give the device time to draft the next round while one is verified (up to 7 tokens ahead);
    with --max-draft 2 a carried draft is longer than the next round may verify and is cut back."""
    from hat.device.cloud_link import CloudLink

    receive = CloudLink.receive

    def slow_receive(self, *args, **kwargs):
        time.sleep(0.1)
        return receive(self, *args, **kwargs)

    monkeypatch.setattr(CloudLink, "receive", slow_receive)
    monkeypatch.setattr(CloudLink, "reply_ready", lambda self: False)
    result = generate_json(capsys, cloud, bundle / "device", "--draft-threshold", 0, "--max-draft", 2)
    assert result["speculative"] is True
    assert result["token_ids"] == plain["token_ids"]
    assert result["predraft_reused_tokens"] > 0, result
    assert result["accept_len"] <= 3
    check_accounting(result)


def test_generate_refuses_a_bad_threshold(cloud, bundle, capsys):
    assert_usage_error(hat_main(capsys, *generate_args(cloud, bundle / "device", "--draft-threshold", 1.5)),
                       "generate", "threshold")


def test_generate_refuses_a_bundle_whose_adapter_does_not_match(bundle, model, work, capsys):
    device = work / "mismatched-device"
    shutil.copytree(bundle / "device", device)
    other_split = save_random_adapter(model, work / "adapter-k3-bundle", seed=0, input_layers=3)
    shutil.copy2(other_split / ADAPTER_CONFIG, device / "adapter" / ADAPTER_CONFIG)
    # refused when the bundle loads, before any cloud is contacted (nothing listens on these ports)
    assert_usage_error(hat_main(capsys, "generate", "--bundle", device, "--cloud", "127.0.0.1", "--data-port", 9,
                                "--control-port", 9, "--prompt", PROMPT, "--timeout", 5),
                       "generate", "K=3, M=1", f"K={K}, M={M}")


def test_a_corrupt_adapter_is_an_error_unless_plain_decoding_is_asked_for(plain, cloud, bundle, work, capsys):
    device = work / "corrupt-adapter-device"
    shutil.copytree(bundle / "device", device)
    weights = device / "adapter" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    assert_usage_error(hat_main(capsys, *generate_args(cloud, device)), "generate", "is corrupt")
    result = generate_json(capsys, cloud, device, "--no-speculation")  # asked for: the adapter is not read
    assert result["speculative"] is False and result["token_ids"] == plain["token_ids"]


def test_generate_speculative_json(speculative_process, plain):
    rc, out, err = finish(speculative_process)
    assert rc == 0, err
    assert "Traceback" not in err
    result = json.loads(out.strip().splitlines()[-1])
    for key in JSON_KEYS:
        assert key in result, key
    assert result["speculative"] is True
    assert result["token_ids"] == plain["token_ids"]
    assert result["text"] == plain["text"]
    check_accounting(result)
    # the adapter is close to the (identity) middle: most draft tokens are accepted, and a round gains more than one
    assert 1.5 < result["accept_len"] <= 9
    assert result["rounds"] < plain["rounds"]
    assert result["drafted_tokens"] > 0 and result["draft_ms"] > 0
    assert isinstance(result["wasted_draft_tokens"], int) and result["wasted_draft_tokens"] >= 0
    assert result["drafted_tokens"] >= (result["accept_len"] - 1) * result["rounds"] - 1e-3


# ---------------------------------------------------------------------------------- train-adapter


def test_train_adapter_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-adapter", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--input-layers", "--output-layers", "--out", "--data", "--steps", "--resume",
                 "--conditioning", "--feature-noise", "--second-step-weight"):
        assert flag in out, flag


def test_train_adapter_refuses_a_missing_model(work, capsys):
    assert_usage_error(hat_main(capsys, "train-adapter", "--model", work / "no-such-model", "--out", work / "t1",
                                "-K", K, "-M", M), "train-adapter", "no-such-model")


def test_train_adapter_writes_an_adapter_split_accepts(model, work, capsys):
    data = work / "train-data"
    data.mkdir()
    for i in range(3):
        (data / f"text{i}.txt").write_text(TOKENIZER_TEXT)
    out = work / "trained"
    rc, stdout, err = hat_main(capsys, "train-adapter", "--model", model, "-K", K, "-M", M, "--out", out,
                               "--steps", 2, "--batch-size", 1, "--seq-len", 32, "--draft-len", 2, "--data", data,
                               "--threads", 1)
    assert rc == 0, err
    assert f"adapter written to {out}" in stdout and "top-1 agreement" in stdout, stdout
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "training_summary.json", "loss_log.csv"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    rc, stdout, err = hat_main(capsys, "split", model, "-K", K, "-M", M, "--out", work / "T", "--adapter", out)
    assert rc == 0, err
    assert (work / "T" / "device" / "adapter" / ADAPTER_WEIGHTS).is_file()


def test_train_adapter_conditioned_flags(model, work, capsys):
    """--conditioning verified (with its training options) writes a format-2 conditioned adapter that split takes;
    the options are refused for an input-only adapter."""
    import json

    data = work / "train-data-conditioned"
    data.mkdir()
    (data / "text.txt").write_text(TOKENIZER_TEXT)
    out = work / "trained-conditioned"
    common = ("--model", model, "-K", K, "-M", M, "--steps", 2, "--batch-size", 1, "--seq-len", 32, "--draft-len", 2,
              "--data", data, "--threads", 1)
    rc, stdout, err = hat_main(capsys, "train-adapter", *common, "--out", out, "--conditioning", "verified",
                               "--feature-noise", 0.1, "--second-step-weight", 0.5)
    assert rc == 0, err
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["conditioning"] == "verified" and config["format_version"] == 2
    summary = json.loads((out / "training_summary.json").read_text())["train_config"]
    assert (summary["feature_noise"], summary["second_step_weight"]) == (0.1, 0.5)
    rc, stdout, err = hat_main(capsys, "split", model, "-K", K, "-M", M, "--out", work / "TC", "--adapter", out)
    assert rc == 0, err
    assert_usage_error(hat_main(capsys, "train-adapter", *common, "--out", work / "t2", "--feature-noise", 0.1),
                       "train-adapter", "--conditioning verified only")
