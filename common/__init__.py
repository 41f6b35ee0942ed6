"""Shared by device and cloud: model runtime, split bundles, wire format, sampling."""
