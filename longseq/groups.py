"""Process groups for sequence parallelism (SP) and data parallelism (DP).

The world (or a group handed in, e.g. Megatron's context-parallel group) is cut into SP groups of
``sp_size`` consecutive ranks, so an SP group stays inside a node when ranks are numbered node by
node; DP groups join the ranks that hold the same position in their SP groups.
For world 4, sp 2: SP groups {0,1} {2,3}; DP groups {0,2} {1,3}.

Every entry that takes groups also takes a ``torch.distributed.device_mesh.DeviceMesh`` and the
name of its SP dimension (``from_mesh(mesh, sp_dim="cp")``; the other dims are DP).
``ParallelGroups.mesh`` is the (dp, sp) mesh in use (built over the groups when they were given as
groups), ``shard_mesh`` the 1-D mesh over every rank of dp x sp (what FSDP2 shards over) and
``dp_mesh`` the 1-D mesh of the DP group.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Optional, Sequence

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ParallelGroups", "init_parallel_groups", "from_existing_groups", "from_mesh", "require_initialized",
           "sp_dp_layout", "sp_group_of", "mesh_of", "check_mesh_dim", "collective_timeout_s", "set_collective_timeout_s",
           "DEFAULT_TIMEOUT_S"]

# The library default for every collective's timeout (seconds): init_distributed and the SP/DP groups
# use it unless told otherwise; the environment variable LONGSEQ_COLLECTIVE_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 600.0
_timeout_s: Optional[float] = None


def set_collective_timeout_s(seconds: float) -> None:
    """Record the timeout (seconds) that groups made from now on get (init_distributed calls it)."""
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {seconds}")
    _timeout_s = float(seconds)


def collective_timeout_s() -> float:
    """The timeout of longseq's collectives: the one given to ``init_distributed`` (or
    ``set_collective_timeout_s``), else ``$LONGSEQ_COLLECTIVE_TIMEOUT_S``, else ``DEFAULT_TIMEOUT_S``."""
    if _timeout_s is not None:
        return _timeout_s
    env = os.environ.get("LONGSEQ_COLLECTIVE_TIMEOUT_S")
    return float(env) if env else DEFAULT_TIMEOUT_S


def require_initialized(what: str = "this call") -> None:
    """Raise a RuntimeError that says how to start ``torch.distributed`` when it is not."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed, which is not initialised. Launch with "
            "`torchrun --nproc_per_node N your_script.py` and call longseq.launch.init_distributed() "
            "(or torch.distributed.init_process_group) first."
        )


def sp_dp_layout(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The SP groups and DP groups (as lists of positions 0..world-1) for a world of this size."""
    if sp_size < 1 or world_size % sp_size != 0:
        raise ValueError(
            f"sequence-parallel size {sp_size} does not divide the world size {world_size}: "
            f"choose sp_size among {[d for d in range(1, world_size + 1) if world_size % d == 0]} "
            f"or launch a multiple of {sp_size} processes."
        )
    dp_size = world_size // sp_size
    sp = [list(range(i * sp_size, (i + 1) * sp_size)) for i in range(dp_size)]
    dp = [list(range(j, world_size, sp_size)) for j in range(sp_size)]
    return sp, dp


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """Who this rank talks to: its SP group and its DP group, with ranks and sizes in each."""

    sp_group: Any
    dp_group: Any
    sp_rank: int
    sp_size: int
    dp_rank: int
    dp_size: int
    sp_global_ranks: tuple[int, ...]
    dp_global_ranks: tuple[int, ...]
    mesh: Optional[DeviceMesh] = None        # the mesh whose ``sp_dim`` is the SP group, other dims DP
    sp_dim: Optional[str] = None
    dp_dims: tuple[str, ...] = ()
    shard_mesh: Optional[DeviceMesh] = None  # 1-D, every rank of dp x sp (FSDP2's shard mesh)
    dp_mesh: Optional[DeviceMesh] = None     # 1-D, the DP group (FSDP over DP only)

    @property
    def world_size(self) -> int:
        return self.sp_size * self.dp_size

    @property
    def is_sp_leader(self) -> bool:
        return self.sp_rank == 0


def _device_type(group: Any) -> str:
    """The device type of a mesh over ``group``: CUDA for NCCL, the CPU otherwise (gloo)."""
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def check_mesh_dim(mesh: DeviceMesh, dim: Optional[str], what: str = "sp_dim") -> str:
    """The name of a dimension of ``mesh`` (``dim``, or the only one of a 1-D mesh); ValueError naming
    the mesh's dims when it has none of that name. Pure: no collective."""
    names = tuple(mesh.mesh_dim_names or ())
    if dim is None:
        if mesh.ndim == 1:
            return names[0] if names else None
        raise ValueError(f"the DeviceMesh has {mesh.ndim} dims {names}: name the sequence-parallel one, e.g. "
                         f"{what}={names[-1]!r}" if names else f"a {mesh.ndim}-D DeviceMesh needs mesh_dim_names")
    if dim not in names:
        raise ValueError(f"{what}={dim!r} is not a dimension of the DeviceMesh (its dims: {names or 'unnamed'}): pass "
                         f"{what}= one of {names}, or build the mesh with mesh_dim_names naming the SP dim "
                         "(e.g. init_device_mesh(device, (dp, sp), mesh_dim_names=('dp', 'sp')))")
    return dim


def sp_group_of(group: Any, sp_dim: Optional[str] = None) -> Any:
    """The SP process group of what a ``parallelize`` got: a :class:`ParallelGroups` (its SP group),
    a ``DeviceMesh`` (the group of its ``sp_dim``, checked first) or a process group (itself)."""
    if isinstance(group, ParallelGroups):
        return group.sp_group
    if isinstance(group, DeviceMesh):
        dim = check_mesh_dim(group, sp_dim)
        return group.get_group(dim) if dim is not None else group.get_group()
    return group


def mesh_of(group: Any) -> Optional[DeviceMesh]:
    """The DeviceMesh behind what a ``parallelize`` got (None for a bare process group)."""
    if isinstance(group, ParallelGroups):
        return group.mesh
    return group if isinstance(group, DeviceMesh) else None


def from_mesh(mesh: DeviceMesh, sp_dim: Optional[str] = "sp", dp_dims: Optional[Sequence[str]] = None) -> ParallelGroups:
    """SP x DP groups from a DeviceMesh: ``sp_dim`` is the SP group, ``dp_dims`` (default: every
    other dim, e.g. ``("dp",)`` of ``("dp", "sp")`` or ``("dp_shard",)`` of torchtitan's
    ``("dp_shard", "cp")``) the DP group. Several DP dims, and the dp x sp shard mesh of a mesh
    with more dims than those, are flattened (``DeviceMesh._flatten``: every rank must call this).

    Errors (before any collective): not initialised; no such dim; a DP dim that is the SP dim.
    """
    require_initialized("longseq.from_mesh")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"from_mesh needs a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    sp_dim = check_mesh_dim(mesh, sp_dim)
    names = tuple(mesh.mesh_dim_names or ())
    dp_dims = tuple(d for d in names if d != sp_dim) if dp_dims is None else tuple(dp_dims)
    for d in dp_dims:
        check_mesh_dim(mesh, d, "dp_dims")
        if d == sp_dim:
            raise ValueError(f"dp_dims={dp_dims} contains the SP dim {sp_dim!r}: the DP dims are the others")

    def sub(dims: tuple) -> Optional[DeviceMesh]:
        if not dims:
            return None
        if len(dims) == 1:
            return mesh[dims[0]] if mesh.ndim > 1 else mesh
        if dims == names:
            return mesh._flatten("_".join(dims))
        return mesh[dims]._flatten("_".join(dims))

    sp_mesh = sub((sp_dim,)) if sp_dim is not None else mesh
    dp_mesh = sub(dp_dims)
    shard_dims = tuple(d for d in names if d in dp_dims or d == sp_dim)
    shard_mesh = sp_mesh if not dp_dims else sub(shard_dims)

    def info(m: Optional[DeviceMesh]):
        if m is None:
            return None, 0, 1, (dist.get_rank(),)
        return m.get_group(), m.get_local_rank(), m.size(), tuple(int(r) for r in m.mesh.flatten().tolist())

    spg, spr, sps, spranks = info(sp_mesh)
    dpg, dpr, dps, dpranks = info(dp_mesh)
    return ParallelGroups(spg, dpg, spr, sps, dpr, dps, spranks, dpranks, mesh=mesh, sp_dim=sp_dim, dp_dims=dp_dims,
                          shard_mesh=shard_mesh, dp_mesh=dp_mesh)


def init_parallel_groups(sp_size: Optional[int] = None, base_group: Any = None, *, mesh: Optional[DeviceMesh] = None,
                         sp_dim: Optional[str] = "sp", dp_dim: str = "dp",
                         timeout_s: Optional[float] = None) -> ParallelGroups:
    """Build SP x DP groups over ``base_group`` (default: the world), or take them from ``mesh``
    (:func:`from_mesh`; ``sp_size``, if given, must be the size of its ``sp_dim``). Every rank must
    call it. The result's ``mesh`` is a (``dp_dim``, ``sp_dim``) DeviceMesh over the groups built.
    The groups built time out after ``timeout_s`` (default :func:`collective_timeout_s`, the one
    ``init_distributed`` got), not torch's 30-minute default for new groups.

    Errors (before any collective): torch.distributed not initialised; sp_size not dividing the size;
    a mesh without ``sp_dim`` or of another SP size.
    """
    require_initialized("longseq.init_parallel_groups")
    if mesh is not None:
        groups = from_mesh(mesh, sp_dim)
        if sp_size is not None and int(sp_size) != groups.sp_size:
            raise ValueError(f"sp_size={sp_size} but the mesh's {sp_dim!r} dim has {groups.sp_size} ranks: pass "
                             f"sp_size={groups.sp_size} or None, or build the mesh with {sp_dim}={sp_size}")
        return groups
    if sp_size is None:
        raise ValueError("init_parallel_groups needs sp_size (ranks per SP group) or mesh=DeviceMesh")
    if not (isinstance(sp_dim, str) and isinstance(dp_dim, str) and sp_dim != dp_dim):
        raise ValueError(f"sp_dim={sp_dim!r} and dp_dim={dp_dim!r} must be two different names")
    base = base_group if base_group is not None else dist.group.WORLD
    size = dist.get_world_size(base)
    me = dist.get_rank(base)
    sp_layout, dp_layout = sp_dp_layout(size, sp_size)
    to_global = [dist.get_global_rank(base, i) for i in range(size)] if base_group is not None else list(range(size))
    mine_sp = mine_dp = None
    timeout = datetime.timedelta(seconds=float(timeout_s) if timeout_s is not None else collective_timeout_s())
    # new_group must be entered by every rank of the world, in the same order.
    for pos in sp_layout:
        ranks = [to_global[i] for i in pos]
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        if me in pos:
            mine_sp = (g, tuple(ranks))
    for pos in dp_layout:
        ranks = [to_global[i] for i in pos]
        g = dist.new_group(ranks, timeout=timeout) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        if me in pos:
            mine_dp = (g, tuple(ranks))
    assert mine_sp is not None and mine_dp is not None
    # The same groups as a DeviceMesh (no new group, no collective): rows are SP groups, columns DP.
    device = _device_type(base)
    grid = [[to_global[i] for i in pos] for pos in sp_layout]
    return ParallelGroups(
        sp_group=mine_sp[0], dp_group=mine_dp[0],
        sp_rank=me % sp_size, sp_size=sp_size,
        dp_rank=me // sp_size, dp_size=size // sp_size,
        sp_global_ranks=mine_sp[1], dp_global_ranks=mine_dp[1],
        mesh=DeviceMesh.from_group([mine_dp[0], mine_sp[0]], device, mesh=grid, mesh_dim_names=(dp_dim, sp_dim)),
        sp_dim=sp_dim, dp_dims=(dp_dim,),
        shard_mesh=DeviceMesh.from_group(base, device, mesh_dim_names=(f"{dp_dim}_{sp_dim}",)),
        dp_mesh=DeviceMesh.from_group(mine_dp[0], device, mesh_dim_names=(dp_dim,)),
    )


def from_existing_groups(sp_group: Any, dp_group: Any = None, *, sp_dim: Optional[str] = "sp") -> ParallelGroups:
    """Wrap groups built elsewhere (e.g. Megatron's context-parallel and data-parallel groups), or a
    DeviceMesh (``from_existing_groups(mesh, sp_dim="cp")`` is :func:`from_mesh`). Groups given as
    groups have no ``mesh`` / ``shard_mesh`` (the whole grid is not known here); FSDP needs one."""
    require_initialized("longseq.from_existing_groups")
    if isinstance(sp_group, DeviceMesh):
        if dp_group is not None:
            raise ValueError("from_existing_groups(mesh): the DP group comes from the mesh's other dims; "
                             "pass dp_group=None")
        return from_mesh(sp_group, sp_dim)
    def info(g):
        if g is None:
            return None, 0, 1, (dist.get_rank(),)
        n = dist.get_world_size(g)
        return g, dist.get_rank(g), n, tuple(dist.get_global_rank(g, i) for i in range(n))
    spg, spr, sps, spranks = info(sp_group)
    dpg, dpr, dps, dpranks = info(dp_group)
    return ParallelGroups(spg, dpg, spr, sps, dpr, dps, spranks, dpranks)
