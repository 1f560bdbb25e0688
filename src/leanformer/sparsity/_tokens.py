"""Which tokens of an FFN call a padding mask describes: shared by `measure_sparsity`, the predictors and the
ProSparse regulariser, so the three agree on every model.

A token is one position of x1 with its feature dimension moved last (`FFN.features_last`) and the other
dimensions its token shape. A (batch, seq) mask fits an FFN whose token shape it is, and also one that flattens
batch and sequence into rows first (OPT's decoder layer runs its FFN on (batch * seq, d)). The FFNs of the
decoder of an encoder-decoder model (T5) have their own length: the encoder's mask is not theirs, the batch's
``decoder_<mask_key>`` is, and without one every decoder token counts. Fused mixture-of-experts x1 has one row
per (token, chosen expert) pair; `rows_mask` gives each row its token's entry.
"""

from __future__ import annotations

import torch

from ._batches import ModelCall
from .ffn import FFN, ExpertRows

__all__ = ["PaddingMasks", "align_mask", "mask_of", "padding_masks", "rows_mask"]

PaddingMasks = dict[bool, "torch.Tensor | None"]  # in_decoder -> the mask of those FFNs' tokens


def padding_masks(call: ModelCall, mask_key: str | None) -> PaddingMasks:
    """The encoder (False) and decoder (True) padding masks of one model call, from ``mask_key`` and
    ``decoder_<mask_key>`` (HF's ``attention_mask`` / ``decoder_attention_mask``); None where absent."""
    return {False: call.padding_mask(mask_key),
            True: call.padding_mask(f"decoder_{mask_key}" if mask_key is not None else None)}


def align_mask(x1: torch.Tensor, mask: torch.Tensor | None, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x1`` (features last) and ``mask`` on its device, shaped alike up to the features: rows of flattened
    tokens are viewed as (batch, seq) again. ValueError naming ``where`` if the mask does not describe them."""
    if mask is None:
        return x1, None
    tokens = tuple(x1.shape[:-1])
    if tuple(mask.shape) != tokens:
        if len(tokens) != 1 or mask.numel() != tokens[0]:
            raise ValueError(f"{where}: attention mask of shape {tuple(mask.shape)} does not match the FFN's tokens "
                             f"{tokens} (x1 has shape {tuple(x1.shape)}, features last)")
        x1 = x1.reshape(*mask.shape, x1.shape[-1])  # batch and sequence flattened into rows, in that order (OPT)
    return x1, mask.to(x1.device)


def mask_of(ffn: FFN, masks: PaddingMasks) -> torch.Tensor | None:
    """The mask that describes ``ffn``'s tokens."""
    return masks[ffn.in_decoder]


def rows_mask(mask: torch.Tensor | None, rows: ExpertRows | None, where: str) -> torch.Tensor | None:
    """``mask`` read at the token of each row of fused experts' x1 (``rows``; ``mask`` itself when None): the
    experts run on batch and sequence flattened, so a (batch, seq) mask must hold exactly that many tokens."""
    if mask is None or rows is None:
        return mask
    if mask.numel() != rows.tokens:
        raise ValueError(f"{where}: attention mask of shape {tuple(mask.shape)} does not match the {rows.tokens} "
                         "tokens (batch and sequence flattened) the experts ran on")
    return mask.reshape(-1).to(rows.index.device)[rows.index]
