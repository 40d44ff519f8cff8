"""Peer-grade baselines (issue 27, item 4): Ulysses sends q, k, v in one all-to-all, the delta
rule's ``heads`` method q, k, v, g, beta in one, ``sync_gradients`` reduces once over SP x DP and
``sp_lm_loss`` reduces its sum and count together. Counts and bytes from the ledger, against the
formulas in the modules' docstrings; values against the unpacked computation."""
import pytest
import torch
import torch.distributed as dist

from longseq.ledger import LEDGER

TIMEOUT = 120


def _ulysses(P_heads, kv_heads):
    from longseq.sp import ulysses_attention
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 4 * P, 8
    q = torch.randn(B, L, P_heads, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, L, kv_heads, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, L, kv_heads, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, L, P_heads, D, generator=g, dtype=torch.float64)
    ql, kl, vl = (torch.tensor_split(t, P, 1)[r].clone().requires_grad_() for t in (q, k, v))
    with LEDGER.recording() as rec:
        out = ulysses_attention(ql, kl, vl, W, causal=True, backend="math", check=False, seq_len=L)  # lengths given
        out.backward(torch.tensor_split(do, P, 1)[r])
    rows = [(x.op, x.tag, x.elements_sent) for x in rec]
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    from longseq.attention import attention
    ref = attention(qf, kf, vf, causal=True, backend="math")
    ref.backward(do)
    err = max(float((a - torch.tensor_split(b, P, 1)[r]).abs().max())
              for a, b in ((out, ref), (ql.grad, qf.grad), (kl.grad, kf.grad), (vl.grad, vf.grad)))
    return rows, err, [ql.numel(), kl.numel(), vl.numel()]


@pytest.mark.parametrize("P,H,HKV", [(2, 4, 2), (4, 4, 4)])
def test_ulysses_packs_q_k_v_into_one_all_to_all(dist_pool, P, H, HKV):
    for rows, err, (mq, mk, mv) in dist_pool(P).run(_ulysses, H, HKV, timeout=TIMEOUT):
        assert err < 1e-12
        tags = [t for _, t, _ in rows]
        assert tags.count("ulysses.qkv") == 1 and tags.count("ulysses.qkv.bwd") == 1, tags
        assert sorted(tags) == sorted(["ulysses.qkv", "ulysses.out", "ulysses.out.bwd", "ulysses.qkv.bwd"]), tags
        sent = {t: n for _, t, n in rows}
        assert sent["ulysses.qkv"] == (mq + mk + mv) * (P - 1) // P        # the three separate exchanges' sum
        assert sent["ulysses.qkv.bwd"] == sent["ulysses.qkv"]
        assert sent["ulysses.out"] == mq * (P - 1) // P


def _heads():
    from longseq.zeco import delta_rule, sp_delta_rule
    P, r, W = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    g = torch.Generator().manual_seed(5)
    B, T, H, K, V = 1, 6 * P, 2 * P, 4, 6
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, H, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    xs = [torch.tensor_split(t, P, 1)[r].clone().requires_grad_() for t in (q, k, v, gate, beta)]
    with LEDGER.recording() as rec:
        o, _ = sp_delta_rule(*xs, group=W, method="heads", use_qk_l2norm=True, check=False)
        o.sum().backward()
    rows = [(x.op, x.tag, x.elements_sent) for x in rec]
    ref = [t.clone().requires_grad_() for t in (q, k, v, gate, beta)]
    o_ref, _ = delta_rule(*ref, use_qk_l2norm=True, backend="torch")
    o_ref.sum().backward()
    err = max([float((o - torch.tensor_split(o_ref, P, 1)[r]).abs().max())]
              + [float((a.grad - torch.tensor_split(b.grad, P, 1)[r]).abs().max()) for a, b in zip(xs, ref)])
    return rows, err, sum(x.numel() for x in xs)


def test_delta_heads_packs_five_inputs_into_one_all_to_all(dist_pool):
    P = 2
    for rows, err, m in dist_pool(P).run(_heads, timeout=TIMEOUT):
        assert err < 1e-10
        fwd = [(op, n) for op, t, n in rows if t == "zeco.delta.heads"]
        assert fwd == [("all_to_all", m * (P - 1) // P)], rows
        assert [t for _, t, _ in rows if t == "zeco.delta.heads.bwd"] == ["zeco.delta.heads.bwd"]


def _grad_sync(sp):
    import longseq
    from longseq.grad_sync import sync_gradients
    groups = longseq.init_parallel_groups(sp)
    r = dist.get_rank()
    params = [torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(7))]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * (r + 1) + i
    with LEDGER.recording() as rec:
        sync_gradients(params, groups)
    rows = [(x.op, x.tag, x.group_size) for x in rec]
    # the definition: sum over this rank's SP group, then mean over the DP groups
    W = dist.get_world_size()
    want = []
    for i, p in enumerate(params):
        base = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
        want.append(sum(base * (j + 1) + i for j in range(W)) / groups.dp_size)
    err = max(float((p.grad - w).abs().max()) for p, w in zip(params, want))
    return rows, err


def test_sync_gradients_one_all_reduce_over_sp_times_dp(dist_pool):
    for rows, err in dist_pool(4).run(_grad_sync, 2, timeout=TIMEOUT):
        assert err < 1e-12
        assert rows == [("all_reduce", "grad_sync", 4)] * 2, rows    # two dtypes: two buckets, one reduce each


def _loss():
    from longseq.zeco import shard_sequence, shift_labels, sp_lm_loss
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (2, 9), generator=g)
    labels = shift_labels(ids)
    labels[0, 3] = -100
    logits = torch.randn(2, 9, 11, generator=g, dtype=torch.float64)
    mine = shard_sequence(logits, W).requires_grad_()
    with LEDGER.recording() as rec:
        loss = sp_lm_loss(mine, shard_sequence(labels, W), W)
    loss.backward()
    whole = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(whole.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    err = max(abs(float(loss - ref)), float((mine.grad - shard_sequence(whole.grad, W)).abs().max()))
    return [(x.op, x.tag) for x in rec], err


def test_lm_loss_one_all_reduce(dist_pool):
    for rows, err in dist_pool(2).run(_loss, timeout=TIMEOUT):
        assert err < 1e-12
        assert rows == [("all_reduce", "zeco.loss")], rows
