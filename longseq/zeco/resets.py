"""Document resets for the linear recurrences (GLA, the gated delta rule), through the decay.

Both recurrences multiply the incoming state by the token's decay before adding its own update::

    GLA:        S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ
    delta rule: S_t = (I - β_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + β_t k_t v_tᵀ

so a document that starts at token t is the same recurrence with ``exp(g_t) = 0``: the state the
token receives is cut, and everything after it starts from the document's own first token. A
reset is therefore a value of the log decay, :data:`RESET_LOG_DECAY` (``-100``: ``exp(-100)`` is
below every float's resolution next to 1, and finite, so the chunked kernels' differences of
cumulative sums stay finite). Everything built from the decays inherits it with no other change:
a piece's map ``(Γ, S_end(0))`` for ZeCO has ``Γ = exp(Σ g) = 0`` (flushed to exactly 0) when a
document starts in it, so the incoming state is cut for every token after the start and All-Scan
still sends one state per rank; the reverse scan multiplies by the same ``Γ``; the chunk kernels see
an ordinary (very strong) decay; the head-sharded and all-gather methods move the reset decays
with the other inputs. The gradient of the user's ``g`` at a reset token is 0 (it multiplies a state
that a separate document would not have), which ``torch.where`` gives.

This is the one place that turns document boundaries (:class:`longseq.documents.Documents`) into
decays; the kernels themselves know nothing of documents.
"""
from __future__ import annotations

from typing import Optional

import torch

from longseq.documents import Documents

__all__ = ["RESET_LOG_DECAY", "reset_decay"]

#: The log decay of the first token of a document (its incoming state is multiplied by exp of it).
RESET_LOG_DECAY = -100.0


def reset_decay(g: torch.Tensor, docs: Optional[Documents]) -> torch.Tensor:
    """``g`` (``[B, T, H]`` or ``[B, T, H, K]``, log space, T = this piece) with
    :data:`RESET_LOG_DECAY` at every token where a document starts (``docs.starts()``); differentiable
    (zero gradient there). ``docs`` None or without a start in the piece: ``g`` unchanged."""
    if docs is None:
        return g
    starts = docs.starts()                                           # [B | 1, T], on the CPU
    if not bool(starts.any()):
        return g
    starts = starts.to(g.device, non_blocking=True)
    mask = starts.view(*starts.shape, *([1] * (g.dim() - 2)))
    return torch.where(mask, torch.full((), RESET_LOG_DECAY, dtype=g.dtype, device=g.device), g)
