"""The testbed's progress bar (tqdm), shared by `hat testbed run` and `hat testbed simulate`."""
from __future__ import annotations


def progress_bar(total: int, enabled: bool, unit: str = "request"):
    """The testbed's progress bar (`hat testbed run` counts requests, `simulate` systems)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True)
