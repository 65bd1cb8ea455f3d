"""Host <-> device copies that never wait for the device's queue.

`torch.tensor(values, device=cuda)` copies from pageable memory and then waits for the stream,
that is for every kernel already queued. With async scheduling the previous step is still
running when the next one is prepared, so per-step inputs go through pinned memory with
non-blocking copies, and outputs come back the same way (the caller waits on an event).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def device_tensor(
    values: Sequence[object], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A host list (possibly nested) as a tensor on `device`; on CUDA without waiting for
    queued kernels."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CUDA tensor in pinned host memory, still in flight (CPU tensors as is):
    read it only after an event recorded after this call has completed."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
