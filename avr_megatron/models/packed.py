"""How packed bins reach the model: [b, s] segment ids (sequence index per token, -1 for a bin's
padding) and, derived from them, the cumulative sequence lengths (cu_seqlens) that both the
Transformer Engine THD path and the local per-sequence attention use. Torch only, so the data
side can build model inputs without importing Megatron."""

from __future__ import annotations

import torch


def cu_seqlens(segment: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths over the flattened batch (bins end to end, each bin's padding
    one more sequence) and the longest sequence, int32."""
    b, s = segment.shape
    flat = segment.reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[::s] = True  # bins never share a sequence (two padding tails either)
    starts = torch.nonzero(change).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
