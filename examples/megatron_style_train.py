"""A Megatron-style pretraining script on longseq: context parallelism (CP) x data parallelism (DP).

Shaped like Megatron-LM's ``pretrain_gpt.py``: Megatron argument names, a ``parallel_state``
that builds its own CP and DP process groups with ``torch.distributed.new_group`` (as
``megatron.core.parallel_state.initialize_model_parallel`` does, here with tensor and pipeline
parallel sizes 1), then ``model_provider()``, ``get_batch()``, ``forward_step()`` returning the
output and a ``loss_func`` that reduces over the CP group, and a ``pretrain()`` loop. The groups
are handed to longseq with ``longseq.from_existing_groups(cp_group, dp_group)``; longseq builds
none of its own.

Models (``--model``):

* ``stdit``  — ``models.stdit.STDiT`` (tiny), DSP (``dsp.parallelize``): the video is sharded along
  frames, the temporal attention runs with the spatial tokens sharded (two all-to-alls a block);
* ``gla``    — ``models.gla.GLAForCausalLM`` (tiny), ZeCO (``zeco.parallelize``, All-Scan):
  the tokens are sharded, labels shifted on the whole sequence first;
* ``latte``  — diffusers' ``LatteTransformer3DModel`` (tiny) with ``longseq.adapters.latte``;
* ``fla-gla`` — fla's ``GLAForCausalLM`` (tiny) with ``longseq.adapters.fla_gla``;
* ``gdn`` / ``hybrid`` — ``models.gdn.GDNForCausalLM`` (tiny / hybrid_tiny: 3 Gated DeltaNet : 1
  attention), ``zeco.plans_delta.parallelize`` (``--cp-comm-type`` zeco, allgather, heads or p2p;
  attention layers through Ulysses).

CPU (gloo), two processes, CP 2::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/megatron_style_train.py \\
        --model stdit --context-parallel-size 2 --micro-batch-size 1 --train-iters 2 --lr 1e-4

Four processes, CP 2 x DP 2, two micro-batches per step::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 examples/megatron_style_train.py \\
        --model gla --context-parallel-size 2 --micro-batch-size 1 --global-batch-size 4 --train-iters 10

Gradients: each CP rank's backward yields its *share* of the gradient (longseq's convention);
``longseq.sync_gradients`` sums the shares over CP and averages over DP, as Megatron's gradient
all-reduce over its data-parallel-with-CP group does.

``--use-torch-fsdp2`` (Megatron's flag): the same groups as a ``DeviceMesh`` ("dp", "cp"), handed
to ``longseq.from_mesh(mesh, sp_dim="cp")``, and the model sharded by FSDP2 over dp x cp after the
CP plan (``longseq.fsdp.apply_fsdp``: its reduce-scatter sums over CP and averages over DP)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 examples/megatron_style_train.py \
        --model stdit --context-parallel-size 2 --global-batch-size 2 --train-iters 3 --use-torch-fsdp2
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longseq import dsp
import longseq
from longseq import zeco
from longseq import functional as LF

MODELS = ("stdit", "gla", "latte", "fla-gla", "gdn", "hybrid")
# --model -> (the module it imports, the longseq extra that installs it)
OPTIONAL = {"latte": ("diffusers", "diffusers"), "fla-gla": ("fla.models", "fla")}
LMS = ("gla", "fla-gla", "gdn", "hybrid")                  # the language models (token data)


# ----------------------------------------------------------------------------------------------
# parallel_state: Megatron's process groups, CP x DP (tensor / pipeline parallel size 1)
# ----------------------------------------------------------------------------------------------
class parallel_state:  # noqa: N801 - the name Megatron users know (megatron.core.parallel_state)
    _CONTEXT_PARALLEL_GROUP = None
    _CONTEXT_PARALLEL_GLOBAL_RANKS = None
    _DATA_PARALLEL_GROUP = None
    _DATA_PARALLEL_GLOBAL_RANKS = None

    @classmethod
    def initialize_model_parallel(cls, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                                  context_parallel_size: int = 1) -> None:
        """Megatron's rank order "tp-cp-dp-pp" with tp = pp = 1: CP groups are consecutive ranks
        (inside a node), DP groups stride over them. Every rank enters every ``new_group`` call in
        the same order, as torch.distributed requires."""
        if tensor_model_parallel_size != 1 or pipeline_model_parallel_size != 1:
            raise ValueError("this example has no tensor or pipeline parallelism: use sizes 1")
        world, rank = dist.get_world_size(), dist.get_rank()
        cp = context_parallel_size
        if cp < 1 or world % cp:
            raise ValueError(f"--context-parallel-size {cp} must divide the world size {world}")
        dp = world // cp
        for i in range(dp):
            ranks = list(range(i * cp, (i + 1) * cp))
            group = dist.new_group(ranks)
            if rank in ranks:
                cls._CONTEXT_PARALLEL_GROUP, cls._CONTEXT_PARALLEL_GLOBAL_RANKS = group, ranks
        for j in range(cp):
            ranks = list(range(j, world, cp))
            group = dist.new_group(ranks)
            if rank in ranks:
                cls._DATA_PARALLEL_GROUP, cls._DATA_PARALLEL_GLOBAL_RANKS = group, ranks

    @classmethod
    def get_context_parallel_group(cls):
        return cls._CONTEXT_PARALLEL_GROUP

    @classmethod
    def get_data_parallel_group(cls):
        return cls._DATA_PARALLEL_GROUP

    @classmethod
    def get_context_parallel_world_size(cls) -> int:
        return dist.get_world_size(cls._CONTEXT_PARALLEL_GROUP)

    @classmethod
    def get_context_parallel_rank(cls) -> int:
        return dist.get_rank(cls._CONTEXT_PARALLEL_GROUP)

    @classmethod
    def get_data_parallel_world_size(cls) -> int:
        return dist.get_world_size(cls._DATA_PARALLEL_GROUP)

    @classmethod
    def get_data_parallel_rank(cls) -> int:
        return dist.get_rank(cls._DATA_PARALLEL_GROUP)


# ----------------------------------------------------------------------------------------------
# Arguments (Megatron's names)
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Megatron-style pretraining on longseq (CP x DP)",
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="stdit")
    g.add_argument("--seq-length", type=int, default=64, help="GLA models: tokens per sample")
    g.add_argument("--num-frames", type=int, default=5, help="video models: latent frames per sample")
    g.add_argument("--img-h", type=int, default=6, help="video models: latent height")
    g.add_argument("--img-w", type=int, default=6, help="video models: latent width")
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", default=None,
                   help="GLA models: zeco (All-Scan, default), lasp1 or lasp2; gdn/hybrid: zeco, allgather, heads, p2p; "
                        "video models: dsp (the only one here)")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default="gloo")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 over dp x cp")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch-size x data-parallel size (one micro-batch per step)")
    g.add_argument("--train-iters", type=int, default=2)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=1)
    args = p.parse_args(argv)
    if args.cp_comm_type is None:
        args.cp_comm_type = "zeco" if args.model in LMS else "dsp"
    valid = (zeco.DELTA_METHODS if args.model in ("gdn", "hybrid") else ("zeco", "lasp1", "lasp2")
             if args.model in LMS else ("dsp",))
    if args.cp_comm_type not in valid:
        p.error(f"--cp-comm-type {args.cp_comm_type} does not fit --model {args.model}; choose from {valid}")
    return args


def print_rank_last(msg: str) -> None:
    """Megatron logs from the last rank (the one holding the loss in pipeline parallelism)."""
    if dist.get_rank() == dist.get_world_size() - 1:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
STATE: dict = {}   # what model_provider set up that the step needs (the DSP handle)


def model_provider(args, groups: longseq.ParallelGroups) -> torch.nn.Module:
    """Build the model (the same weights on every rank: seeded) and make it context-parallel."""
    torch.manual_seed(args.seed)
    if args.model == "stdit":
        from longseq.models.stdit import STDiT, stdit_config
        model = STDiT(stdit_config("tiny"))
        STATE["handle"] = dsp.parallelize(model, groups, gather_output=False)
    elif args.model == "latte":
        from longseq.adapters import latte
        model = latte.build(video_length=args.num_frames, sample_size=args.img_h, out_channels=4)
        STATE["handle"] = latte.parallelize(model, groups, gather_output=False)
    elif args.model == "gla":
        from longseq.models.gla import GLAForCausalLM, gla_config
        model = GLAForCausalLM(gla_config("tiny"))
        zeco.parallelize(model, groups.sp_group, method=args.cp_comm_type)
    elif args.model in ("gdn", "hybrid"):
        from longseq.models.gdn import GDNForCausalLM, gdn_config
        model = GDNForCausalLM(gdn_config("tiny" if args.model == "gdn" else "hybrid_tiny"))
        zeco.plans_delta.parallelize(model, groups.sp_group, method=args.cp_comm_type)
    else:
        from longseq.adapters import fla_gla
        model = fla_gla.build()
        STATE["handle"] = fla_gla.parallelize(model, groups, method=args.cp_comm_type)
    return model


def fsdp_units(model: torch.nn.Module) -> list:
    """The modules FSDP2 shards one by one: ST-DiT's spatial and temporal stages (its forward calls
    them, not the blocks), a GLA LM's layers; other models are sharded as one unit (the root)."""
    if blocks := getattr(model, "blocks", None):
        if all(hasattr(b, "spatial") and hasattr(b, "temporal") for b in blocks):
            return [m for b in blocks for m in (b.spatial, b.temporal)]
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


# ----------------------------------------------------------------------------------------------
# Data: the same sample on every rank of a CP group, different samples across DP groups
# ----------------------------------------------------------------------------------------------
def _alpha_bar(t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 2e-2, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[t].float()


def train_data_iterator(args, dp_rank: int, dp_size: int, num_microbatches: int):
    """Synthetic samples, deterministic per (seed, global sample index); DP group d takes its
    contiguous part of each global batch, every CP rank of the group the same samples."""
    mbs, it = args.micro_batch_size, 0
    while True:
        for m in range(num_microbatches):
            first = (it * dp_size + dp_rank) * num_microbatches * mbs + m * mbs
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + first)
            if args.model in LMS:
                vocab = 64
                yield {"tokens": torch.randint(0, vocab, (mbs, args.seq_length), generator=gen)}
            else:
                T, H, W = args.num_frames, args.img_h, args.img_w
                x0 = torch.randn(mbs, 4, T, H, W, generator=gen)
                noise = torch.randn(mbs, 4, T, H, W, generator=gen)
                t = torch.randint(0, 1000, (mbs,), generator=gen)
                text = 16 if args.model == "stdit" else 12
                yield {"x0": x0, "noise": noise, "t": t, "caption": torch.randn(mbs, 3, text, generator=gen)}
        it += 1


def get_batch(data_iterator, args):
    """Megatron's get_batch + get_batch_on_this_cp_rank: the whole sample, then this CP rank's
    piece of what the model does not shard itself. GLA: tokens and the labels (shifted on the
    *whole* sequence, so a piece's last target is the next piece's first token). Video: the model's
    DSP entry shards the input along frames; the target (the noise) is sharded here to match."""
    batch = next(data_iterator)
    cp_group = parallel_state.get_context_parallel_group()
    if args.model in LMS:
        tokens = batch["tokens"]
        labels = zeco.shift_labels(tokens)
        loss_mask = (labels != -100).float()
        return (zeco.shard_sequence(tokens, cp_group), zeco.shard_sequence(labels, cp_group),
                zeco.shard_sequence(loss_mask, cp_group))
    ab = _alpha_bar(batch["t"]).view(-1, 1, 1, 1, 1)
    x_t = ab.sqrt() * batch["x0"] + (1 - ab).sqrt() * batch["noise"]
    target = STATE["handle"].shard_target(batch["noise"])
    return x_t, batch["t"], batch["caption"], target


def loss_func(args, target_or_mask, output_tensor):
    """Megatron's loss_func: the local sum and count, all-reduced over the CP group (one
    all-reduce of 2 numbers; its backward is the identity, so each CP rank's backward is its share),
    then the mean. Returns the loss and the logged value."""
    if args.model in LMS:
        labels, loss_mask = target_or_mask
        losses = F.cross_entropy(output_tensor.float().reshape(-1, output_tensor.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100, reduction="none")
        local = torch.stack([(losses * loss_mask.reshape(-1)).sum(), loss_mask.sum()])
        name = "lm loss"
    else:
        target = target_or_mask
        local = torch.stack([(output_tensor.float() - target).pow(2).sum(),
                             torch.tensor(float(target.numel()))])
        name = "mse loss"
    total = LF.all_reduce_sum(local, parallel_state.get_context_parallel_group(), tag="cp.loss")
    loss = total[0] / total[1]
    return loss, {name: loss.detach()}


def forward_step(data_iterator, model, args):
    """Megatron's forward_step: (output_tensor, partial(loss_func, ...))."""
    if args.model in LMS:
        tokens, labels, loss_mask = get_batch(data_iterator, args)
        out = model(input_ids=tokens) if args.model == "fla-gla" else model(tokens)
        output_tensor = out.logits if hasattr(out, "logits") else out
        return output_tensor, functools.partial(loss_func, args, (labels, loss_mask))
    x_t, t, caption, target = get_batch(data_iterator, args)
    if args.model == "latte":
        output_tensor = model(x_t, timestep=t, encoder_hidden_states=caption).sample
    else:
        output_tensor = model(x_t, t.float(), caption)
    return output_tensor, functools.partial(loss_func, args, target)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def _lr(args, it: int) -> float:
    if it < args.lr_warmup_iters:
        return args.lr * (it + 1) / args.lr_warmup_iters
    frac = (it - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters)
    if args.lr_decay_style == "constant":
        return args.lr
    if args.lr_decay_style == "linear":
        return args.min_lr + (args.lr - args.min_lr) * (1 - frac)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def pretrain(model_provider_func, forward_step_func, argv=None) -> list[float]:
    args = parse_args(argv)
    if args.model in OPTIONAL:        # before any process group: one line (from rank 0), nothing hangs
        module, extra = OPTIONAL[args.model]
        why = longseq.optional.missing(module, extra=extra, what=f"--model {args.model}")
        if why:
            if os.environ.get("RANK", "0") == "0":
                print(f"megatron_style_train.py: {why}", file=sys.stderr, flush=True)
            raise SystemExit(2)
    if args.distributed_backend == "nccl":
        raise SystemExit("this example runs its tiny models on CPU processes: use --distributed-backend gloo")
    if not dist.is_initialized():
        longseq.init_distributed(backend="gloo", timeout_s=60.0 * args.distributed_timeout_minutes)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             args.context_parallel_size)
    cp_group, dp_group = parallel_state.get_context_parallel_group(), parallel_state.get_data_parallel_group()
    if args.use_torch_fsdp2:
        # Megatron's rank order: CP groups are the rows of a (dp, cp) grid; the same groups as a mesh.
        from torch.distributed.device_mesh import DeviceMesh
        cp = args.context_parallel_size
        grid = torch.arange(dist.get_world_size()).view(-1, cp)
        mesh = DeviceMesh.from_group([dp_group, cp_group], "cpu", mesh=grid, mesh_dim_names=("dp", "cp"))
        groups = longseq.from_mesh(mesh, sp_dim="cp")
    else:
        groups = longseq.from_existing_groups(cp_group, dp_group)
    dp_size, dp_rank = groups.dp_size, groups.dp_rank
    gbs = args.global_batch_size or args.micro_batch_size * dp_size
    if gbs % (args.micro_batch_size * dp_size):
        raise SystemExit(f"--global-batch-size {gbs} must be a multiple of micro-batch-size x DP "
                         f"({args.micro_batch_size} x {dp_size})")
    num_microbatches = gbs // (args.micro_batch_size * dp_size)
    print_rank_last(f"> world {dist.get_world_size()}: context-parallel {groups.sp_size} x data-parallel {dp_size}; "
                    f"model {args.model} ({args.cp_comm_type}); global batch {gbs} = {num_microbatches} micro-batches "
                    f"of {args.micro_batch_size} x DP {dp_size}")

    model = model_provider_func(args, groups)
    fsdp = None
    if args.use_torch_fsdp2:          # after the CP plan; per unit the model's forward calls, then the root
        fsdp = longseq.fsdp.apply_fsdp(model, groups, "full", units=fsdp_units(model))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.adam_beta1, args.adam_beta2))
    data_iterator = train_data_iterator(args, dp_rank, dp_size, num_microbatches)
    losses = []
    for it in range(args.train_iters):
        start = time.perf_counter()
        lr = _lr(args, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logged = 0.0
        for _ in range(num_microbatches):
            output_tensor, lf = forward_step_func(data_iterator, model, args)
            loss, stats = lf(output_tensor)
            (loss / num_microbatches).backward()
            logged += float(next(iter(stats.values()))) / num_microbatches
        for p in model.parameters():          # every rank must hand the same set to the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if fsdp is None:                      # FSDP2's reduce-scatter already summed over CP, averaged over DP
            longseq.sync_gradients(model.parameters(), groups)
        grad_norm = longseq.fsdp.grad_norm(list(model.parameters()), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the logged loss: the mean over DP groups (each CP rank already holds its group's loss)
        avg = torch.tensor([logged], dtype=torch.float64)
        if dp_size > 1:
            dist.all_reduce(avg, group=parallel_state.get_data_parallel_group())
            avg /= dp_size
        losses.append(float(avg))
        if (it + 1) % args.log_interval == 0:
            name = next(iter(stats))
            print_rank_last(
                f" iteration {it + 1:8d}/{args.train_iters:8d} | consumed samples: {(it + 1) * gbs:12d} | "
                f"elapsed time per iteration (ms): {1000 * (time.perf_counter() - start):.1f} | "
                f"learning rate: {lr:.6E} | global batch size: {gbs:5d} | {name}: {losses[-1]:.6E} | "
                f"grad norm: {float(grad_norm):.3f} |")
    handle = STATE.pop("handle", None)
    if handle is not None:
        handle.remove()
    print_rank_last(f"[after training is done] {args.train_iters} iterations, final loss {losses[-1]:.6E}")
    return losses


if __name__ == "__main__":
    pretrain(model_provider, forward_step)
    dist.barrier()
    dist.destroy_process_group()
