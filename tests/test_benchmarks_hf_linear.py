"""The cost-model half of ``python -m longseq.benchmarks.hf_linear`` (no processes): the bytes follow
the ledger formulas with grouped value heads and KDA's per-channel gate."""
from longseq.benchmarks import hf_linear
from longseq.benchmarks.costmodel import delta as cm


def test_grouped_heads_and_kda_gate_in_the_bytes():
    s = hf_linear.QWEN3_NEXT
    T, P = 4096, 8
    # zeco: one K x V float32 state per value head, forward and backward
    assert cm.bytes_per_rank("zeco", P, T, s["H"], s["K"], s["V"], s["Hk"], s["gk"]) == 2 * s["H"] * s["K"] * s["V"] * 4
    # heads: q, k with the key heads, v, gate, beta with the value heads, then the output back (bf16)
    want = 2 * (P - 1) / P * T * (2 * s["Hk"] * 128 + s["H"] * (128 + 1 + 1) + s["H"] * 128) * 2
    assert cm.bytes_per_rank("heads", P, T, s["H"], s["K"], s["V"], s["Hk"], s["gk"]) == want
    # KDA's gate has K channels a head: more to move than a scalar gate
    assert cm.bytes_per_rank("heads", P, T, 32, 128, 128, 32, 128) > cm.bytes_per_rank("heads", P, T, 32, 128, 128)
    # the default keeps the old (ungrouped, scalar gate) formula
    assert cm.bytes_per_rank("heads", P, T, 16, 128, 128) == 2 * (P - 1) / P * T * 16 * (2 * 128 + 128 + 2 + 128) * 2


def test_cost_table_rows():
    lines = hf_linear.cost_table("Qwen3-Next", hf_linear.QWEN3_NEXT, 16384, [8, 64], "h100_ib")
    r8, r64 = lines[3].split(), lines[4].split()
    assert r8[0] == "8" and r64[0] == "64"
    assert r8[1] == r64[1] == f"{2 * 32 * 128 * 128 * 4 * 36 / 2**20:.1f}"     # zeco flat in P
    assert float(r64[2]) > float(r8[2])                                       # allgather grows with P
    assert r64[4] == "n/a" and r64[8] == "n/a" and r8[4] != "n/a"             # heads: P must divide 32 value heads
