"""Pure arithmetic of uneven sharding, following ``torch.tensor_split``.

A dimension of size n over P ranks: rank r holds ``split_sizes(n, P)[r]`` elements, the first
``n % P`` ranks one more than the rest, contiguous and in rank order.
"""
from __future__ import annotations

__all__ = ["split_sizes", "shard_range", "check_shardable"]


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(n), parts)``: ``[n//P + 1]*(n%P) + [n//P]*(P - n%P)``."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    # piece r is ceil((n - r) / P): the same sizes, as arithmetic that also works on symbolic
    # sizes (torch.compile's dynamic shapes), without branching on n % P
    return [(n + parts - 1 - r) // parts for r in range(parts)]


def shard_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` of piece ``index`` of a dimension of size n split into ``parts``."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def check_shardable(n: int, parts: int, what: str) -> None:
    """Raise a ValueError naming the dimension when it has fewer elements than ranks."""
    if n < parts:
        raise ValueError(
            f"cannot shard {what} of size {n} over {parts} ranks: every rank needs at least one element. "
            f"Use a sequence-parallel size <= {n}, or a larger {what}."
        )
