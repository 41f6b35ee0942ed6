"""Messages inside a disaggregated cloud: router <-> workers, and KV caches handed from worker to worker.

On a worker's connection to the router, a cluster message is [b"", ClusterHeader] (a device message
there always starts with the device's routing id, never empty). A session's KV goes worker to worker
layer by layer as [ClusterHeader(KV_LAYER), keys, values]: each tensor a zero-copy view of one layer
[kv_heads, length, head_dim], so the receiver writes layer i while layer i + 1 is still in transit.
Every decoder checks what a peer could get wrong before it is used and raises ClusterError.
"""
from __future__ import annotations

import torch
from google.protobuf.message import DecodeError

from hat.common.kv_cache import KVCache
from hat.common.proto import hat_pb2 as pb
from hat.common.wire import TORCH_TO_WIRE, WIRE_TO_TORCH, WIRE_VERSION

MAX_CLUSTER_HEADER_BYTES = 8192
KNOWN_CLUSTER_KINDS = frozenset(pb.ClusterKind.values()) - {pb.CLUSTER_UNSPECIFIED}


class ClusterError(ValueError):
    """A cluster message that cannot be used."""


def cluster_header(kind: int, **fields) -> pb.ClusterHeader:
    return pb.ClusterHeader(version=WIRE_VERSION, kind=kind, **fields)


def encode_cluster(header: pb.ClusterHeader) -> list:
    """Frames of a cluster message on the router connection (the empty frame marks it as one)."""
    return [b"", header.SerializeToString()]


def decode_cluster_header(frame) -> pb.ClusterHeader:
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    if len(buffer) > MAX_CLUSTER_HEADER_BYTES:
        raise ClusterError(f"cluster header of {len(buffer)} bytes exceeds {MAX_CLUSTER_HEADER_BYTES}")
    header = pb.ClusterHeader()
    try:
        header.ParseFromString(bytes(buffer))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"undecodable cluster header: {exc}") from None
    if header.version != WIRE_VERSION:
        raise ClusterError(f"cluster wire version {header.version}, expected {WIRE_VERSION}")
    if header.kind not in KNOWN_CLUSTER_KINDS:
        raise ClusterError(f"unknown cluster message kind {header.kind}")
    return header


def encode_kv_layer(meta: pb.SessionMeta, cache: KVCache, layer: int, handoff_id: int = 0) -> list:
    """Frames carrying layer `layer` of `cache` (its valid positions); the tensors are contiguous copies of the
    cache's strided slices, sent without a further copy."""
    length = cache.length
    keys = cache.keys[layer, :, :length].contiguous().cpu()
    values = cache.values[layer, :, :length].contiguous().cpu()
    header = cluster_header(pb.KV_LAYER, session=meta, layer=layer, num_layers=cache.num_layers, length=length,
                            dtype=TORCH_TO_WIRE[keys.dtype], shape=list(keys.shape), handoff_id=handoff_id)
    return [header.SerializeToString(), keys.reshape(-1).view(torch.uint8).numpy(),
            values.reshape(-1).view(torch.uint8).numpy()]


def decode_kv_layer(frames: list, expect: tuple[int, int, int], dtype: torch.dtype
                    ) -> tuple[pb.ClusterHeader, torch.Tensor, torch.Tensor]:
    """Parse a KV_LAYER message for a part of `expect` = (num_layers, kv_heads, head_dim) layers in `dtype`."""
    if len(frames) != 3:
        raise ClusterError(f"a KV layer is 3 frames, got {len(frames)}")
    header = decode_cluster_header(frames[0])
    if header.kind != pb.KV_LAYER:
        raise ClusterError(f"expected KV_LAYER, got {pb.ClusterKind.Name(header.kind)}")
    num_layers, kv_heads, head_dim = expect
    if header.num_layers != num_layers or not header.layer < num_layers:
        raise ClusterError(f"layer {header.layer} of {header.num_layers}; this part has {num_layers} layers")
    if WIRE_TO_TORCH.get(header.dtype) != dtype:
        raise ClusterError(f"KV dtype {header.dtype}, this part's is {dtype}")
    shape = list(header.shape)
    if shape != [kv_heads, header.length, head_dim] or not header.session.session_id:
        raise ClusterError(f"KV shape {shape} for {header.length} positions; expected [{kv_heads}, "
                           f"{header.length}, {head_dim}] of a named session")
    nbytes = kv_heads * header.length * head_dim * dtype.itemsize
    tensors = []
    for frame in frames[1:]:
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        if len(buffer) != nbytes:
            raise ClusterError(f"KV frame of {len(buffer)} bytes; shape {shape} of {dtype} needs {nbytes}")
        tensors.append(torch.frombuffer(buffer, dtype=dtype).view(*shape) if nbytes else torch.empty(shape, dtype=dtype))
    return header, tensors[0], tensors[1]
