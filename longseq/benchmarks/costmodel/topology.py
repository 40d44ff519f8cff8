"""Machines for the cost model: nodes of G devices, one link class inside a node, one between nodes.

Ranks are numbered node by node (rank r lives on node r // G) and an SP group is P consecutive
ranks starting at a multiple of P, as :func:`longseq.init_parallel_groups` builds them: a group of
P <= G ranks (G a multiple of P) stays inside one node; a group of P > G ranks spans P / G whole
nodes.

A :class:`Link` is alpha-beta: sending a message of n bytes over it takes ``alpha + n / bw``.
``bw`` is the bandwidth one device gets for its own traffic in one direction (per-GPU NIC for
InfiniBand; the NVLink share of one GPU through NVSwitch), ``alpha`` the per-message latency.

Optional ``fits`` replace the generic collective algorithms by a measured alpha-beta line for
one (op, group size): ``{("all_to_all", 4): Link(...)}``, time = alpha + bytes sent by a rank /
bw. The gloo calibration of this machine (``benchmarks.calibrate``) is expressed that way, since
gloo's algorithms over TCP loopback are not NCCL's.

``contention_cores`` / ``dilation``: CPU machines only. P processes that each compute on one thread
share the cores, so a rank computes slower while all ranks compute: by the measured ``dilation[P]``
(``benchmarks.calibrate``), else ``max(1, P / cores)``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Link", "Topology"]


@dataclasses.dataclass(frozen=True)
class Link:
    alpha: float            # seconds per message
    bw: float               # bytes per second, one direction, one device

    def time(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.alpha + nbytes / self.bw


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    gpus_per_node: int
    intra: Link
    inter: Link
    peak_flops: float = 0.0          # per device, dense, the training dtype
    mfu: float = 0.4                 # achieved fraction of peak_flops (when compute comes from FLOPs)
    fits: tuple = ()                 # ((op, P, Link), ...): measured lines that override the algorithms
    contention_cores: Optional[int] = None
    dilation: tuple = ()             # ((P, factor), ...) measured; overrides P / cores

    def fit(self, op: str, P: int) -> Optional[Link]:
        for o, p, link in self.fits:
            if o == op and p == P:
                return link
        return None

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def link(self, a: int, b: int) -> Link:
        """The link a message from rank a to rank b crosses."""
        return self.intra if self.node(a) == self.node(b) else self.inter

    @staticmethod
    def members(P: int, start: int = 0, stride: int = 1) -> list[int]:
        """Global ranks of a group: ``start, start+stride, ...`` (stride 1: consecutive ranks; USP's
        ring groups have stride = its Ulysses degree)."""
        return [start + k * max(stride, 1) for k in range(P)]

    def spans_nodes(self, P: int, start: int = 0, stride: int = 1) -> bool:
        m = self.members(P, start, stride)
        return self.node(m[0]) != self.node(m[-1])

    def peers(self, P: int, rank: int = 0, start: int = 0, stride: int = 1) -> tuple[int, int]:
        """(peers of ``rank`` in its node, peers in other nodes) within the group."""
        same = sum(1 for q in self.members(P, start, stride) if q != rank and self.node(q) == self.node(rank))
        return same, P - 1 - same

    def compute_dilation(self, P: int) -> float:
        """How much slower a rank computes while all P compute (CPU machines); 1 on GPUs."""
        for p, f in self.dilation:
            if p == P:
                return f
        if not self.contention_cores:
            return 1.0
        return max(1.0, P / self.contention_cores)

    @staticmethod
    def from_config(cfg) -> "Topology":
        """From a mapping (Hydra / OmegaConf or dict) with the keys of configs/simulate/topology/*.yaml."""
        def get(c, k, default=None):
            try:
                v = c[k]
            except (KeyError, TypeError):
                return default
            return default if v is None else v
        intra, inter = get(cfg, "intra"), get(cfg, "inter")
        fits = []
        for f in get(cfg, "fits", []) or []:
            fits.append((str(f["op"]), int(f["P"]), Link(float(f["alpha_us"]) * 1e-6, float(f["bw_GBps"]) * 1e9)))
        return Topology(
            name=str(get(cfg, "name", "topology")),
            gpus_per_node=int(get(cfg, "gpus_per_node", 8)),
            intra=Link(float(intra["alpha_us"]) * 1e-6, float(intra["bw_GBps"]) * 1e9),
            inter=Link(float(inter["alpha_us"]) * 1e-6, float(inter["bw_GBps"]) * 1e9),
            peak_flops=float(get(cfg, "peak_tflops", 0.0)) * 1e12,
            mfu=float(get(cfg, "mfu", 0.4)),
            fits=tuple(fits),
            contention_cores=get(cfg, "contention_cores", None),
            dilation=tuple(sorted((int(k), float(v)) for k, v in (get(cfg, "dilation", {}) or {}).items())),
        )
