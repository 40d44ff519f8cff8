"""DeviceMesh in (CPU gloo, 4 processes): ``longseq.from_mesh`` / ``init_parallel_groups`` /
``from_existing_groups`` take a mesh and the name of its SP dim (("dp", "sp"), torchtitan's
("dp_shard", "cp"), a 3-D mesh whose DP dims are flattened), and ``dsp.parallelize``,
``longseq.sp.parallelize`` and ``zeco.parallelize`` take a mesh + ``sp_dim`` and give the same
output as with the process group (exactly: the same group underneath). A mesh without the named
dim raises before any collective (the ledger records nothing)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _layouts():
    import longseq
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    g = longseq.init_parallel_groups(2)
    out["init"] = (g.mesh.mesh_dim_names, g.mesh["sp"].get_group() is g.sp_group, g.shard_mesh.size(), g.dp_mesh.size())
    tt = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
    h = longseq.from_existing_groups(tt, sp_dim="cp")
    out["titan"] = (h.sp_global_ranks, h.dp_global_ranks, h.sp_rank, h.dp_rank, h.dp_dims, h.shard_mesh.size())
    m3 = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
    k = longseq.init_parallel_groups(mesh=m3, sp_dim="cp")
    out["3d"] = (k.sp_size, k.dp_size, k.dp_dims, k.dp_global_ranks, k.shard_mesh.size())
    with longseq.recording() as rec:
        for bad in (dict(mesh=tt, sp_dim="sp"), dict(mesh=tt, sp_dim="cp", sp_size=4)):
            try:
                longseq.init_parallel_groups(**bad)
            except ValueError as e:
                out.setdefault("errors", []).append(str(e))
    out["no_collective"] = len(rec) == 0
    return out


def test_mesh_layouts_and_errors(dist_pool):
    out = dist_pool(4).run(_layouts)
    for r, o in enumerate(out):
        assert o["init"] == (("dp", "sp"), True, 4, 2)
        assert o["titan"] == ((2 * (r // 2), 2 * (r // 2) + 1), (r % 2, r % 2 + 2), r % 2, r // 2, ("dp_shard",), 4)
        assert o["3d"] == (2, 2, ("dp_replicate", "dp_shard"), (r % 2, r % 2 + 2), 4)
        assert "sp_dim='sp' is not a dimension of the DeviceMesh (its dims: ('dp_shard', 'cp'))" in o["errors"][0]
        assert "sp_size=4 but the mesh's 'cp' dim has 2 ranks" in o["errors"][1]
        assert o["no_collective"]


def _parallelize_with_mesh():
    import longseq
    from longseq import dsp, sp, zeco
    from longseq.models import STDiT, stdit_config
    from longseq.models.gla import GLAForCausalLM, gla_config
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
    group = mesh.get_group("cp")
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(1, 4, 4, 8, 8, generator=g), torch.rand(1, generator=g) * 1000, torch.randn(1, 3, 16, generator=g)
    ids = torch.randint(0, 64, (1, 16), generator=g)
    out = {}
    for name in ("dsp", "ulysses"):
        res = []
        for via in (mesh, group):
            torch.manual_seed(0)
            model = STDiT(stdit_config("tiny"))
            h = (dsp.parallelize(model, via, sp_dim="cp") if name == "dsp"
                 else sp.parallelize(model, via, method=name, sp_dim="cp"))
            res.append((model(x, t, y).detach(), h.mesh is mesh))
            h.remove()
        out[name] = (torch.equal(res[0][0], res[1][0]), res[0][1], res[1][1] is False)
    res = []
    for via in (mesh, group):
        torch.manual_seed(0)
        model = GLAForCausalLM(gla_config("tiny"))
        zeco.parallelize(model, via, sp_dim="cp")
        res.append(model(zeco.shard_sequence(ids, group)).detach())
    out["zeco"] = torch.equal(res[0], res[1])
    return out


def test_parallelize_takes_a_mesh(dist_pool):
    for o in dist_pool(4).run(_parallelize_with_mesh):
        assert o["dsp"] == (True, True, True) and o["ulysses"] == (True, True, True) and o["zeco"]


def _train_with_mesh(out_dir):
    from longseq.train.config import ConfigError, load_config, validate
    from longseq.train.loop import train
    from torch.distributed.device_mesh import init_device_mesh

    base = ["model=stdit_tiny", "parallel=dsp", "parallel.sp_size=2", "model.sample.frames=4", "model.sample.height=8",
            "model.sample.width=8", "train.steps=2", "train.global_batch_size=2", "train.save_checkpoints=false",
            "train.resume=none", "train.tensorboard=false"]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
    runs = {}
    for name, extra, m in (("groups", [], None), ("mesh", ["parallel.mesh_dims=[dp_shard,cp]"], mesh)):
        cfg = load_config(base + extra + [f"train.out_dir={out_dir}/{name}"])
        runs[name] = train(cfg, validate(cfg, world=4), mesh=m)["losses"]
    cfg = load_config(base + [f"train.out_dir={out_dir}/bad"])          # mesh_dims [dp, sp]: no 'sp' dim
    try:
        train(cfg, validate(cfg, world=4), mesh=mesh)
    except ConfigError as e:
        runs["bad"] = str(e)
    runs["still_initialized"] = dist.is_initialized()
    return runs


def test_training_entry_takes_a_mesh(dist_pool, tmp_path):
    """``longseq.train.loop.train(cfg, layout, mesh=...)`` with torchtitan's dim names gives the
    losses of the groups it builds itself, and leaves the caller's process group alone."""
    for o in dist_pool(4).run(_train_with_mesh, str(tmp_path)):
        assert len(o["mesh"]) == 2 and o["mesh"] == o["groups"], o
        assert "sp_dim='sp' is not a dimension of the DeviceMesh" in o["bad"] and "parallel.mesh_dims" in o["bad"]
        assert o["still_initialized"]
