"""RoPE by position ids on the local layer spec.

Megatron-Core's GPTModel rotates every token by its index in the row and ignores
`position_ids`. For packed bins of separate sequences that is enough (scores depend only on the
distance between query and key, the same within a sequence wherever it sits in the row), but a
preference pair whose shared prompt is computed once (`collate(share_prompt=True)`) has the
rejected sequence's tail attend the chosen sequence's prompt from further along the row: only
rotating each token by its own position in its sequence gives the right distances.
`PositionalRoPEGPTModel` gathers the rotary table by `position_ids` ([b, s] -> freqs
[s, b, 1, dim], which Megatron's unfused RoPE broadcasts per token); with `position_ids` None it
is GPTModel. The Transformer Engine (THD) path restarts positions per sequence itself and keeps
GPTModel.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class PositionalRoPEGPTModel(GPTModel):
    """GPTModel whose rotary embedding follows `position_ids` (see the module docstring)."""

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        emb = out[1]
        if position_ids is None or not isinstance(emb, torch.Tensor):
            return out
        if position_ids.device.type == "cpu" and int(position_ids.max()) >= emb.shape[0]:
            emb = self.rotary_pos_emb(int(position_ids.max()) + 1)
        freqs = emb[position_ids.t().to(emb.device), 0, 0]  # [s, b, dim]
        return (out[0], freqs.unsqueeze(2)) + tuple(out[2:])
