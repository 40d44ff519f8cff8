"""Document boundaries of packed windows, and each rank's view of them.

A training window of ``T`` tokens may hold several documents packed back to back. Their boundaries
are ``cu_seqlens`` (fla / flash-attention's name): an int tensor ``[0, e_1, ..., e_{D-1}, T]`` of the
cumulative document lengths, ``[D + 1]`` (the same boundaries for every row of the batch) or
``[B, D + 1]`` (one row per sample; a row with fewer documents repeats ``T`` at its end: an empty
document is allowed and changes nothing). The boundaries describe the **whole window** and are
identical on every rank of a sequence-parallel group; the tokens are sharded (``tensor_split``
pieces, :mod:`longseq.sharding`), and :class:`Documents` is one rank's view: the window's
boundaries plus the range ``[start, stop)`` of this rank's piece.

Conventions (every op of longseq follows them; docs/documents.md, "Conventions"):

* A document starts at each interior boundary ``e_1 .. e_{D-1}``: recurrent state and attention do
  not cross it, a short convolution reads nothing before it. The window's first token is *not* a
  reset: the first document continues from the op's ``initial_state`` (zero by default), so a
  window cut from the middle of a document can carry that document's state in; the final state is
  that of the last document.
* :meth:`Documents.starts` marks, per local token, whether a document starts there;
  :meth:`Documents.positions` gives each token's index inside its document (positions that restart
  per document, for a model with position embeddings); :meth:`Documents.ids` the document index of
  each token (for masks across pieces); :meth:`Documents.local_cu_seqlens` the piece's own segments
  in fla's varlen form.
* The loss ignores the target of the last token of each document (the next token is another
  document's first): :func:`document_labels`.

No communication happens here; the pieces' ranges follow from the window length and the group
(:func:`for_rank`) or are given (:meth:`Documents.for_piece`, for any split).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch

from .sharding import shard_range

__all__ = ["Documents", "check_cu_seqlens", "cu_seqlens_from_lengths", "for_rank", "resolve", "document_labels",
           "attention_mask", "CuSeqlens"]


def check_cu_seqlens(cu_seqlens: Any, total: Optional[int] = None, *, batch: Optional[int] = None,
                     what: str = "cu_seqlens") -> torch.Tensor:
    """``cu_seqlens`` as a CPU int64 tensor ``[D + 1]`` or ``[B, D + 1]``, checked: starts at 0, never
    decreases, every row ends at the same total (``total`` when given), ``B == batch`` when given.
    Raises ``ValueError`` naming the rule broken."""
    cu = torch.as_tensor(cu_seqlens)
    if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
        raise ValueError(f"{what} must hold integers (cumulative document lengths), got dtype {cu.dtype}")
    cu = cu.detach().to("cpu", torch.int64)
    if cu.dim() not in (1, 2) or cu.shape[-1] < 2:
        raise ValueError(f"{what} must be [D + 1] or [B, D + 1] with D >= 1 documents, e.g. [0, 5, 12] for two "
                         f"documents of 5 and 7 tokens; got shape {tuple(cu.shape)}")
    if batch is not None and cu.dim() == 2 and cu.shape[0] != batch:
        raise ValueError(f"{what} has {cu.shape[0]} rows but the batch has {batch}: give one row per sample "
                         "or one 1-D tensor for all")
    if bool((cu[..., 0] != 0).any()):
        raise ValueError(f"{what} must start at 0, got {cu[..., 0].tolist()}")
    if bool((cu[..., 1:] < cu[..., :-1]).any()):
        raise ValueError(f"{what} must not decrease (cumulative lengths), got {cu.tolist()}")
    ends = cu[..., -1].reshape(-1)
    if bool((ends != ends[0]).any()):
        raise ValueError(f"every row of {what} must end at the window length (repeat it to pad a row with fewer "
                         f"documents), got ends {ends.tolist()}")
    if total is not None and int(ends[0]) != int(total):
        raise ValueError(f"{what} ends at {int(ends[0])} but the window has {int(total)} tokens: cu_seqlens must "
                         "cover the whole window (every rank passes the same window boundaries)")
    return cu


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """``[0, l_0, l_0 + l_1, ...]`` (int64) for documents of these lengths."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.as_tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Documents:
    """One rank's view of a packed window: the whole window's ``cu_seqlens`` (``[D+1]`` or
    ``[B, D+1]``, CPU int64) and this rank's piece ``[start, stop)`` of the sequence dim."""

    cu_seqlens: torch.Tensor
    start: int
    stop: int

    @classmethod
    def for_piece(cls, cu_seqlens: Any, start: int, stop: int, *, batch: Optional[int] = None) -> "Documents":
        """The view of the piece ``[start, stop)`` (any split)."""
        cu = check_cu_seqlens(cu_seqlens, batch=batch)
        T = int(cu[..., -1].reshape(-1)[0])
        if not 0 <= start <= stop <= T:
            raise ValueError(f"piece [{start}, {stop}) is not inside the window of {T} tokens")
        return cls(cu, int(start), int(stop))

    @classmethod
    def whole(cls, cu_seqlens: Any, *, batch: Optional[int] = None) -> "Documents":
        """One process: the piece is the whole window."""
        cu = check_cu_seqlens(cu_seqlens, batch=batch)
        return cls(cu, 0, int(cu[..., -1].reshape(-1)[0]))

    @property
    def total(self) -> int:
        """Tokens in the whole window."""
        return int(self.cu_seqlens[..., -1].reshape(-1)[0])

    @property
    def length(self) -> int:
        """Tokens in this rank's piece."""
        return self.stop - self.start

    def _rows(self) -> torch.Tensor:
        return self.cu_seqlens if self.cu_seqlens.dim() == 2 else self.cu_seqlens.unsqueeze(0)

    def ids(self, device: Any = None, *, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """``[B | 1, n]`` int64: the document index of each token of ``[start, stop)`` (default: this
        piece), counted over the whole window (empty documents are counted too)."""
        a = self.start if start is None else start
        b = self.stop if stop is None else stop
        t = torch.arange(a, b, dtype=torch.int64)
        rows = self._rows()
        ids = torch.searchsorted(rows[:, 1:-1].contiguous(), t.expand(rows.shape[0], -1).contiguous(), right=True)
        return ids.to(device) if device is not None else ids

    def positions(self, device: Any = None) -> torch.Tensor:
        """``[B | 1, n]`` int64: each token's index inside its document (restarts at every document)."""
        ids = self.ids()
        doc_start = torch.gather(self._rows(), 1, ids)
        pos = torch.arange(self.start, self.stop, dtype=torch.int64) - doc_start
        return pos.to(device) if device is not None else pos

    def starts(self, device: Any = None) -> torch.Tensor:
        """``[B | 1, n]`` bool: True at the tokens where a document starts (the window's token 0 not
        included: the first document continues the initial state)."""
        s = self.positions() == 0
        if self.start == 0 and s.shape[1]:
            s[:, 0] = False
        return s.to(device) if device is not None else s

    def has_starts(self) -> bool:
        """Whether a document starts inside this piece (after its first token or at it)."""
        return bool(self.starts().any())

    def local_cu_seqlens(self) -> torch.Tensor:
        """The piece's own segments in fla's varlen form, ``[0, ..., n]`` (1-D; needs a 1-D
        ``cu_seqlens``, i.e. the same boundaries for every row): the boundaries inside the piece."""
        if self.cu_seqlens.dim() != 1:
            raise ValueError("local_cu_seqlens needs one set of boundaries for the batch (a 1-D cu_seqlens)")
        inner = self.cu_seqlens[(self.cu_seqlens > self.start) & (self.cu_seqlens < self.stop)] - self.start
        return torch.cat([torch.zeros(1, dtype=torch.int64), inner.unique_consecutive(),
                          torch.tensor([self.length], dtype=torch.int64)])

    def signature(self) -> tuple:
        """A small hashable summary of the window's boundaries (for cross-rank checks)."""
        return (tuple(self.cu_seqlens.shape), hash(tuple(self.cu_seqlens.reshape(-1).tolist())))


CuSeqlens = Union[torch.Tensor, Documents, Sequence[int]]


def for_rank(cu_seqlens: Any, group: Any, *, batch: Optional[int] = None) -> Documents:
    """This rank's :class:`Documents` when the window is split in ``tensor_split`` pieces over
    ``group`` (a process group or a ``longseq.ParallelGroups``; None without torch.distributed: one
    process). No communication."""
    from .positions import _size_rank
    cu = check_cu_seqlens(cu_seqlens, batch=batch)
    T = int(cu[..., -1].reshape(-1)[0])
    P, r = _size_rank(group)
    a, b = shard_range(T, P, r)
    return Documents(cu, a, b)


def resolve(cu_seqlens: Optional[CuSeqlens], length: int, group: Any = None, *, batch: Optional[int] = None,
            what: str = "cu_seqlens") -> Optional[Documents]:
    """The :class:`Documents` an op works with: ``None`` stays None; a :class:`Documents` is checked
    against this rank's ``length``; a tensor of the whole window's boundaries is placed with the
    ``tensor_split`` piece of ``group`` (None: one process holds the whole window). Raises
    ``ValueError`` (before any collective) when the piece does not have ``length`` tokens."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, Documents):
        docs = cu_seqlens
        if batch is not None and docs.cu_seqlens.dim() == 2 and docs.cu_seqlens.shape[0] != batch:
            raise ValueError(f"{what} has {docs.cu_seqlens.shape[0]} rows but the batch has {batch}")
    elif group is None:
        docs = Documents.whole(cu_seqlens, batch=batch)
    else:
        docs = for_rank(cu_seqlens, group, batch=batch)
    if docs.length != length:
        raise ValueError(
            f"{what}: this rank holds {length} tokens but its piece of the {docs.total}-token window is "
            f"[{docs.start}, {docs.stop}) ({docs.length} tokens). cu_seqlens describes the whole window and assumes "
            "the tensor_split pieces (longseq.sharding.split_sizes); for another split pass "
            "longseq.documents.Documents.for_piece(cu_seqlens, start, stop)")
    return docs


def document_labels(labels: torch.Tensor, docs: Documents, ignore_index: int = -100) -> torch.Tensor:
    """``labels [B, n]`` (next-token targets of this piece) with the target of each document's last
    token set to ``ignore_index``: the token after it is the first of another document, which the
    model may not predict from this one. (The first token of a document keeps its target, the
    second token; it is predicted from itself alone.)"""
    rows = docs._rows()
    t = torch.arange(docs.start, docs.stop, dtype=torch.int64)
    ends = rows[:, 1:-1]                                             # interior boundaries e_1 .. e_{D-1}
    ends = ends.masked_fill(ends >= docs.total, -1)                  # padding (empty documents at the end)
    last = (t.view(1, -1, 1) + 1 == ends.unsqueeze(1)).any(-1)       # t + 1 starts a document
    return labels.masked_fill(last.to(labels.device).expand_as(labels), ignore_index)


def attention_mask(q: Documents, k: Optional[Documents] = None, *, causal: bool = True,
                   device: Any = None) -> torch.Tensor:
    """Bool ``[B | 1, Lq, Lk]``, True where a query of piece ``q`` may attend to a key of piece ``k``
    (default: the same piece): same document, and with ``causal`` the key's window position not after
    the query's. The block-diagonal causal mask over the whole window when both are the whole
    window; one ring step's mask for two pieces."""
    k = q if k is None else k
    m = q.ids().unsqueeze(2) == k.ids().unsqueeze(1)
    if causal:
        m = m & (torch.arange(k.start, k.stop).view(1, 1, -1) <= torch.arange(q.start, q.stop).view(1, -1, 1))
    return m.to(device) if device is not None else m
