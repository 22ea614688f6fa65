"""Attention inside each sequence of a padding-free (packed) batch, for SDPA.

TRL's `padding_free` / `packing` puts a batch's sequences one after another in a single row, with
`position_ids` restarting at 0 for each sequence and no attention mask. JetMoE honours that: rotary
positions come from `position_ids`, routing is per token, and transformers' mask builder turns restarting
positions into a block-diagonal mask. With SDPA that mask is [T, T] over the whole row, so attention costs
(sum of lengths)^2 instead of the sum of squared lengths: packing 8 sequences of 2,048 tokens does 8x the
attention work of the padded batch. `packed_sdpa` runs causal SDPA on each sequence's own slice instead
(flash-attention's varlen path does the same in one kernel where it is installed). Anything else (a
padding mask, generation with a cache) goes to transformers' own SDPA unchanged.

Use: `use_packed_attention(model)` switches a model whose attention is `sdpa` to `sdpa_packed`.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignment.errors import SmoeError

NAME = "sdpa_packed"


def sequence_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """position_ids [B, T] restarting at 0 for each packed sequence -> per row, (start, end) of each sequence."""
    bounds = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        bounds.append(list(zip(starts, [*starts[1:], row.numel()])))
    return bounds


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query / key / value [B, heads, T, d] -> ([B, T, heads, d], None), as transformers' attention functions."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2] or position_ids.shape[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = sequence_bounds(position_ids.expand(query.shape[0], -1))
    if all(len(row) == 1 for row in bounds):  # nothing packed: one batched causal call
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("s_aux") is not None:
        raise SmoeError("packing with sliding-window attention or attention sinks is not built", "recipe key packing", "set packing: false")
    grouped = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key-value heads
    rows = []
    # split, not slices: the backward of each slice would fill a zero tensor of the whole batch and add them
    # up (3 x sequences of them per layer); a split's backward puts its pieces' gradients together once.
    # Pieces stay 4-D [1, heads, length, d], which the CPU's flash kernel needs.
    for row, q, k, v in zip(bounds, query.split(1), key.split(1), value.split(1)):
        lengths = [e - s for s, e in row]
        pieces = [
            F.scaled_dot_product_attention(q_piece, k_piece, v_piece, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped)
            for q_piece, k_piece, v_piece in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return (torch.cat(rows) if len(rows) > 1 else rows[0]).transpose(1, 2).contiguous(), None


def packed_mask(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """No [T, T] mask for an unpadded training batch: `packed_sdpa` keeps attention inside each sequence."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, packed_mask)


def use_packed_attention(model) -> bool:
    """Switch `model` (or the model under a PEFT wrapper) from SDPA to `sdpa_packed`; False if it is not on SDPA."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    if config._attn_implementation != "sdpa":
        return False  # eager builds the block mask itself; flash-attention has its own varlen path
    config._attn_implementation = NAME
    return True
