"""A disaggregated cloud as real `hat cloud serve` processes: a router, a prefill and two decode workers.

Four devices in this process generate at once through the router (policy "always": every session
prefills on the prefill worker and decodes on a decode worker); one decode process is SIGKILLed while
it holds sessions mid-generation. Every device still ends with exactly transformers' greedy tokens,
at the cost of a re-prefill (recoveries >= 1). Mistaken start-ups exit non-zero and say why: a
decode worker without --router, a worker whose bundle is another model's ("refused").
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack

import pytest

from checkpoints import TOKENIZER_TEXT
from hat.common.split import split_checkpoint
from hat.device.cloud_link import CloudLink, LinkConfig
from hat.device.device_model import DeviceModel
from hat.device.generator import SplitGenerator
from eight_devices import FAMILY, K, M, reference_tokens, run_concurrently, slow_rounds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LENGTHS = [7, 15, 24, 33]  # one per device
NEW_TOKENS = 28
START_TIMEOUT_S = 120.0  # a process importing torch and loading its bundle on a busy 2-core machine
EXIT_TIMEOUT_S = 90.0
ROUND_DELAY_S = 0.01  # each device round slowed this much, so sessions are surely mid-run at the kill


class Serve:
    """A `hat cloud serve` child process; its output (stdout and stderr) is read on a thread as it comes."""

    def __init__(self, *args: str):
        self.args = args
        self.process = subprocess.Popen([sys.executable, "-m", "hat.cli.main", "cloud", "serve", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        """The first output line matching `pattern`; fails if the process ends or the time runs out first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines:
                    match = re.match(pattern, line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    break
                self._changed.wait(left)
        raise AssertionError(f"`hat cloud serve {' '.join(self.args)}` printed no line matching {pattern!r} "
                             f"(exit status {self.process.poll()}):\n{self.output()[-3000:]}")

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S, fail_on: str = r"^ready") -> tuple[int, str]:
        """Exit status and the whole output of a process expected to end by itself; it is stopped, and the test
        fails, if it prints a line matching `fail_on` (it started serving) or is still running after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._done and time.monotonic() < deadline:
                if re.search(fail_on, "".join(self.lines), re.MULTILINE):
                    break
                self._changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        if not self._done:
            self.stop()
            raise AssertionError(f"`hat cloud serve {' '.join(self.args)}` did not exit by itself:\n"
                                 f"{self.output()[-3000:]}")
        return self.process.wait(10), self.output()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def metric(metrics_url: str, name: str) -> float:
    """A gauge's or counter's value from a `/metrics` endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in {metrics_url}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    """The model's device and cloud bundles, the cloud bundle of another model, the devices' prompts and
    transformers' greedy continuations of them."""
    model_dir = tiny_checkpoint(FAMILY)
    work = tmp_path_factory.mktemp("disaggregated-cli")
    device_dir, cloud_dir = split_checkpoint(model_dir, K, M, work / "bundle")
    _, other_cloud_dir = split_checkpoint(tiny_checkpoint("qwen2"), K, M, work / "other")
    ids = DeviceModel.load(device_dir).tokenizer(TOKENIZER_TEXT)["input_ids"]
    prompts = [ids[5 * i:5 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]
    assert [len(p) for p in prompts] == PROMPT_LENGTHS
    return device_dir, cloud_dir, other_cloud_dir, prompts, reference_tokens(model_dir, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def router(bundles):
    """`hat cloud serve --role router` on free loopback ports: (process, data port, control port, workers address,
    metrics url)."""
    _, cloud_dir, *_ = bundles
    process = Serve("--role", "router", "--bundle", str(cloud_dir), "--data", "tcp://127.0.0.1:0", "--control",
                    "127.0.0.1:0", "--workers", "tcp://127.0.0.1:0", "--disaggregation", "always", "--metrics",
                    "127.0.0.1:0", "--drain-timeout", "1")
    try:
        ready = process.wait_for(r"ready data=tcp://127\.0\.0\.1:(\d+) control=127\.0\.0\.1:(\d+) "
                                 r"workers=(tcp://127\.0\.0\.1:\d+) metrics=(http://\S+/metrics)$")
        yield process, int(ready.group(1)), int(ready.group(2)), ready.group(3), ready.group(4)
    finally:
        process.stop()


def start_worker(role: str, router_address: str, bundle, *extra: str) -> Serve:
    return Serve("--role", role, "--router", router_address, "--bundle", str(bundle), "--threads", "1", *extra)


def test_a_decode_worker_needs_the_router_address(bundles):
    _, cloud_dir, *_ = bundles
    process = Serve("--role", "decode", "--bundle", str(cloud_dir), "--threads", "1")
    try:
        code, output = process.wait_exit()
    finally:
        process.stop()
    assert code != 0, output
    assert "--router" in output and "decode" in output, output


def test_a_worker_serving_another_model_is_refused(bundles, router):
    """A decode worker started on another model's bundle: the router refuses it, the process says so and exits
    non-zero; the router registers nobody."""
    _, _, other_cloud_dir, *_ = bundles
    _, _, _, workers_address, metrics_url = router
    process = start_worker("decode", workers_address, other_cloud_dir)
    try:
        code, output = process.wait_exit()
    finally:
        process.stop()
    assert code != 0, output
    assert "refused" in output and "checkpoint" in output, output
    assert not re.search(r"^ready", output, re.MULTILINE), output
    assert metric(metrics_url, "hat_router_workers") == 0


def test_a_decode_process_killed_mid_run_costs_only_a_re_prefill(bundles, router):
    """Four devices generate at once through the router; once the router has handed sessions to both decode
    workers and one of them holds sessions, that process is SIGKILLed. The router takes it for dead, its
    sessions' devices re-open and re-send their history (prefilled again, handed to the surviving decode
    worker), and every device ends with exactly transformers' greedy tokens."""
    device_dir, _, _, prompts, reference = bundles
    router_process, data_port, control_port, workers_address, router_metrics = router
    with ExitStack() as stack:
        workers = {}
        for role, name in (("prefill", "prefill-0"), ("decode", "decode-victim"), ("decode", "decode-survivor")):
            worker = start_worker(role, workers_address, bundles[1], "--worker-id", name, "--metrics", "127.0.0.1:0")
            stack.callback(worker.stop)
            workers[name] = worker
        metrics = {}
        for name, worker in workers.items():
            ready = worker.wait_for(rf"ready role=(\w+) worker={name} router={re.escape(workers_address)} "
                                    r"kv=tcp://\S+ layers=\[\d+,\d+\) metrics=(http://\S+/metrics)$")
            metrics[name] = ready.group(2)
        assert metric(router_metrics, "hat_router_workers") == 3
        victim_name = "decode-victim"
        victim = workers[victim_name]

        gens = []
        for i in range(len(prompts)):
            model = DeviceModel.load(device_dir)
            link = stack.enter_context(CloudLink(LinkConfig(host="127.0.0.1", data_port=data_port,
                                                            control_port=control_port, device_id=f"cli-device-{i}",
                                                            reply_timeout_s=30.0)))
            link.register(model.manifest)
            slow_rounds(link, ROUND_DELAY_S)
            gens.append(SplitGenerator(model, link))

        killed = threading.Event()
        seen: dict[str, float] = {}

        def kill_when_busy() -> None:
            """SIGKILL the victim once both decode workers got sessions and the victim holds some now."""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    seen["handoffs"] = metric(router_metrics, "hat_handoffs_total")
                    seen["victim_sessions"] = metric(metrics[victim_name], "hat_sessions")
                except OSError:  # a scrape refused under load: try again
                    time.sleep(0.01)
                    continue
                if seen["handoffs"] >= 2 and seen["victim_sessions"] >= 1:
                    victim.process.send_signal(signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.01)

        results = run_concurrently(gens, prompts, alongside=kill_when_busy, new_tokens=NEW_TOKENS)
        assert killed.is_set(), f"the victim never held a session ({seen})"
        assert victim.process.wait(10) == -signal.SIGKILL

        assert [r.token_ids for r in results] == reference
        assert sum(r.recoveries for r in results) >= 1
        assert metric(router_metrics, "hat_workers_lost_total") == 1
        assert metric(router_metrics, "hat_router_workers") == 2
        assert metric(metrics["decode-survivor"], "hat_forward_batches_total") > 0
        for name in ("prefill-0", "decode-survivor"):  # every session closed on the live workers
            deadline = time.monotonic() + 5
            while metric(metrics[name], "hat_sessions") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric(metrics[name], "hat_sessions") == 0
            assert metric(metrics[name], "hat_kv_blocks_used") == 0
        assert router_process.process.poll() is None
