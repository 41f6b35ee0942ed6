"""The multiprocessing context of the testbed's helper processes (emulated devices, link shims, the cloud-only
server): a fork server that has imported their modules once, so each process starts in a fraction of a second.

With "spawn" every such process started a fresh interpreter and imported torch, transformers and the device agent
again (5-6 s of CPU each, and more than that on a loaded machine); a run of three systems started nine of them. The
fork server is one process per parent, started on first use; it imports, and runs nothing, so no thread pool exists
when it forks. Where the platform has no fork server, "spawn" as before.
"""
from __future__ import annotations

import multiprocessing

# imported once by the fork server: every target of a testbed process, and what a first DeviceModel.load imports
# (transformers' tokenizer classes; its modeling utilities, which pull in accelerate and more: 2-3 s alone)
PRELOAD = ("hat.testbed.emulated_device", "hat.testbed.cloud_only", "hat.testbed.link_shim",
           "transformers.models.auto.tokenization_auto", "transformers.modeling_utils")


def process_context():
    """The context to create testbed processes (and their queues, events, pipes) with."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *PRELOAD])  # no effect once the server runs (the same list)
    return context
