"""Full-3D attention inside a DSP stage: attention over a flattened multi-dimensional sequence
(T·H·W video tokens) whose pieces are this rank's rows of a sharded dimension.

A stage marked ``Stage(..., attention=True)`` (or ``attention=Joint(...)``) keeps its activation
sharded (``shard`` = the plan's home, e.g. frames T); the engine runs the stage module's forward
with every ``torch.nn.functional.scaled_dot_product_attention`` call inside it redirected to a
sequence-parallel attention (:func:`sequence_attention`) over the group: Ulysses, ring or USP,
with each rank's own token count (``T_r·H·W``: the pieces follow the sharded dim, not
``tensor_split`` of the tokens). The redirection is PyTorch's public ``TorchFunctionMode``, active
only during that module's forward: the model's own attention code (a diffusers attention processor
through its ``native`` backend, or any module calling SDPA) runs unchanged and is not copied.

Joint attention (text tokens concatenated to the video tokens inside the attention, as CogVideoX
and HunyuanVideo do): ``Joint(arg, at)`` names the stage argument holding the text states
(replicated on every rank, ``[B, N, C]``) and where the processor puts them (``"start"`` or
``"end"`` of the sequence). Ulysses: the video tokens go through the all-to-alls, each rank takes
its own heads of the text q/k/v locally, attends ``[video, text]`` with ``H/P`` heads and
all-gathers the text output over the heads (``<tag>.text``, backward a reduce-scatter). Ring: every
rank's queries are ``[text, video_r]`` and rank 0's key/value piece carries the text keys, so each
query sees every key once; the text rows are computed identically on every rank (their gradients
are per-rank shares, longseq's convention). A key-padding mask over the text keys is supported by
Ulysses (the video keys must be unmasked); ring and USP take no mask.

Shapes: SDPA's ``[B, H, L, D]`` in and out; ``sequence_attention`` takes flash-attn's
``[B, L, H, D]``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from longseq import comm
from longseq import functional as LF

__all__ = ["Joint", "METHODS", "sequence_attention", "SDPARedirect"]

METHODS = ("ulysses", "ring", "usp")


@dataclasses.dataclass(frozen=True)
class Joint:
    """Text tokens the stage's attention concatenates to the video tokens: the stage argument
    ``arg`` (``[B, N, C]``, the same on every rank) and their place, ``"start"`` or ``"end"``."""

    arg: str = "encoder_hidden_states"
    at: str = "start"

    def __post_init__(self) -> None:
        if self.at not in ("start", "end"):
            raise ValueError(f"Joint(at=...) must be 'start' or 'end', not {self.at!r}")


def _split(x: torch.Tensor, n: int, at: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, text) rows of ``x [B, L, ...]`` with ``n`` text rows at ``at``."""
    if at == "start":
        return x[:, n:], x[:, :n]
    return x[:, :x.shape[1] - n], x[:, x.shape[1] - n:]


def _join(video: torch.Tensor, text: torch.Tensor, at: str) -> torch.Tensor:
    return torch.cat([text, video] if at == "start" else [video, text], dim=1)


def _text_key_mask(mask: Optional[torch.Tensor], lk_local: int, n: int, at: str, B: int) -> Optional[torch.Tensor]:
    """The text part ``[B, 1, 1, N]`` (bool: True attends) of a key-padding mask over the local
    keys ``[video_r, text]``; raises if the mask is not a key-padding mask or masks a video key."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != lk_local:
        raise ValueError(f"sequence-parallel attention takes only a key-padding mask [B, 1, 1, Lk] (Lk = "
                         f"{lk_local}), got one of shape {list(mask.shape)}")
    keep = mask if mask.dtype == torch.bool else mask > -1e4
    video, text = _split(keep.squeeze(1).squeeze(1).unsqueeze(-1), n, at)
    if not bool(video.all()):
        raise ValueError("sequence-parallel attention: the mask hides video keys; only text keys may be masked")
    return text.squeeze(-1)[:, None, None, :].expand(B, 1, 1, n)


def _local(q, k, v, scale, mask=None):
    """Attention on this rank, flash layout ``[B, L, H, D]``."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, *, method: str,
                       sizes: Sequence[int], usp: Any = None, text: int = 0, at: str = "start",
                       mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       tag: str = "dsp.attn") -> torch.Tensor:
    """Non-causal attention over the whole sequence, each rank holding its piece.

    q, k, v ``[B, text + sizes[rank], H, D]``: this rank's ``sizes[rank]`` video tokens (every
    rank's count in ``sizes``, contiguous in rank order) and, with ``text > 0``, the ``text``
    replicated joint tokens at ``at``. ``method``: ``"ulysses"`` (heads divisible by P), ``"ring"``
    or ``"usp"`` (``usp``: the :class:`longseq.sp.USPGroups`; no text). ``mask``: a key-padding
    mask over the local keys, text keys only (Ulysses). Returns ``[B, text + sizes[rank], H, D]``."""
    from longseq.sp.ring import ring_attention
    from longseq.sp.ulysses import ulysses_attention
    from longseq.sp.usp import usp_attention
    if method not in METHODS:
        raise ValueError(f"unknown sequence-parallel attention {method!r}; valid: {', '.join(METHODS)}")
    P, r = comm.group_size(group), comm.group_rank(group)
    sizes = [int(n) for n in sizes]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qv, qt = _split(q, text, at)
    kv_, kt = _split(k, text, at)
    vv, vt = _split(v, text, at)
    tmask = _text_key_mask(mask, k.shape[1], text, at, q.shape[0]) if text else None
    if mask is not None and not text:
        raise ValueError("sequence-parallel attention takes no mask over video keys")
    if method == "usp":
        if text:
            raise NotImplementedError("USP with joint text tokens is not implemented: use attention='ulysses' or "
                                      "'ring' for this model")
        return usp_attention(qv, kv_, vv, usp, softmax_scale=scale, seq_sizes=sizes, tag=tag)
    if method == "ring":
        if tmask is not None and not bool(tmask.all()):
            raise NotImplementedError("ring attention takes no mask: a text padding mask needs attention='ulysses'")
        if not text:
            return ring_attention(qv, kv_, vv, group, softmax_scale=scale, seq_sizes=sizes, tag=tag)
        # rank 0's key/value piece carries the text keys; every rank's queries include the text
        k0 = torch.cat([kt, kv_], 1) if r == 0 else kv_
        v0 = torch.cat([vt, vv], 1) if r == 0 else vv
        out = ring_attention(torch.cat([qt, qv], 1), k0, v0, group, softmax_scale=scale,
                             seq_sizes=[sizes[0] + text] + sizes[1:], tag=tag)
        return _join(out[:, text:], out[:, :text], at)
    if not text:
        return ulysses_attention(qv, kv_, vv, group, softmax_scale=scale, seq_sizes=sizes, tag=tag)
    H = q.shape[2]
    if H % P:
        raise ValueError(f"Ulysses splits the {H} heads over {P} ranks; use attention='ring'")
    h = H // P
    mine = slice(r * h, (r + 1) * h)
    text_out = []

    def joint(qh, kh, vh, **_):          # whole video, this rank's heads, and the text's same heads
        m = None
        if tmask is not None:        # [B, 1, 1, L + N]: every video key, the text keys as masked
            ones = tmask.new_ones(qh.shape[0], 1, 1, kh.shape[1])
            m = torch.cat([tmask, ones] if at == "start" else [ones, tmask], dim=-1)
        o = _local(_join(qh, qt[:, :, mine], at), _join(kh, kt[:, :, mine], at), _join(vh, vt[:, :, mine], at),
                   scale, m)
        ov, ot = _split(o, text, at)
        text_out.append(ot)
        return ov

    out_v = ulysses_attention(qv, kv_, vv, group, softmax_scale=scale, seq_sizes=sizes, attn_fn=joint, tag=tag)
    out_t = LF.all_gather(text_out[0].contiguous(), group, dim=2, tag=f"{tag}.text")
    return _join(out_v, out_t, at)


class SDPARedirect(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention(q, k, v, ...)`` (``[B, H, L, D]``) calls
    ``fn(q, k, v, attn_mask, scale)`` with flash-layout tensors and returns its result in SDPA's
    layout; ``calls`` counts the redirected calls. Dropout and ``is_causal`` raise (a full-3D
    video attention is neither)."""

    def __init__(self, fn, where: str):
        super().__init__()
        self.fn, self.where, self.calls = fn, where, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args), **kwargs)
        if a.get("dropout_p", 0.0) or a.get("is_causal", False) or a.get("enable_gqa", False):
            raise NotImplementedError(f"{self.where}: sequence-parallel attention takes no dropout, causal mask or "
                                      "grouped-query attention")
        self.calls += 1
        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
        return self.fn(q, k, v, a.get("attn_mask"), a.get("scale")).transpose(1, 2)
