"""The multiprocessing context of the testbed's helper processes (emulated devices, the cloud-only server): a fork
server, so each process starts in a fraction of a second. (Link shims are spawned: see LinkShim.)

With "spawn" every such process started a fresh interpreter that imported the caller's main module again and its
own (torch, transformers and the device agent: 5-6 s of CPU each, more on a loaded machine); a run of three systems
started nine of them. The fork server is one process per parent, started by the first process created; it imports,
and runs nothing, so no thread pool exists when it forks. Callers whose processes run a model ask for DEVICE_PRELOAD
(imported once by the server). Where the platform has no fork server, "spawn" as before.
"""
from __future__ import annotations

import multiprocessing

# what a device or cloud-only process imports: its target's module, and what a first DeviceModel.load imports
# (transformers' tokenizer classes; its modeling utilities, which pull in accelerate and more: 2-3 s alone)
DEVICE_PRELOAD = ("hat.testbed.emulated_device", "hat.testbed.cloud_only", "hat.testbed.link_shim",
                  "transformers.models.auto.tokenization_auto", "transformers.modeling_utils")


def process_context(preload: tuple[str, ...] = ()):
    """The context to create testbed processes (and their queues, events, pipes) with; `preload`: modules for the
    fork server to import once, if it is not running yet (the main module is always imported)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if preload:  # no effect once the server runs; a call without leaves an earlier caller's list in place
        context.set_forkserver_preload(["__main__", *preload])
    return context
