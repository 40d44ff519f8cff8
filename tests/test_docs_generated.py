"""The tables in the docs are the benchmarks' own output, not hand-copied numbers that drift.

Each generated block of a doc (``<!-- generated: NAME -->``, :mod:`longseq.benchmarks.docblocks`) must
equal the results file the benchmark wrote beside its JSON (or, for the simulator, the tables in
``benchmarks/results/simulate.json``). Rerunning a benchmark with ``--update-docs`` (simulate:
``update_docs=true``) keeps them equal. No benchmark runs here.
"""
import json

import pytest

from longseq.benchmarks.docblocks import read_block, replace_block
from longseq.benchmarks.paths import ROOT

FILES = [
    ("docs/zeco.md", "overlap_cpu", "benchmarks/results/overlap_cpu.md"),
    ("docs/scaling.md", "overlap_cpu", "benchmarks/results/overlap_cpu.md"),
    ("docs/scaling.md", "scaling_cpu", "benchmarks/results/scaling_cpu_rounds.md"),
    ("docs/compile.md", "compile_cpu", "benchmarks/results/compile_cpu.md"),
    ("docs/compile.md", "peer_cpu", "benchmarks/results/peer_cpu.md"),
]


@pytest.mark.parametrize("doc,name,src", FILES)
def test_doc_block_is_the_benchmark_output(doc, name, src):
    block = read_block(ROOT / doc, name)
    assert block is not None, f"{doc} has no generated block '{name}'"
    assert block == (ROOT / src).read_text(), f"{doc} '{name}' differs from {src}: rerun the benchmark with --update-docs"


def test_simulator_tables_in_docs_are_its_output():
    from longseq.benchmarks.simulate import DOC_BLOCKS, doc_text
    tables = json.loads((ROOT / "benchmarks/results/simulate.json").read_text())["tables"]
    for name, txt in zip(DOC_BLOCKS, tables):
        assert read_block(ROOT / "docs/scaling.md", name) == doc_text(txt), \
            f"docs/scaling.md '{name}' differs from simulate.json: python -m longseq.benchmarks.simulate update_docs=true"


def test_replace_block_round_trip(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("a\n<!-- generated: t -->\nold\n<!-- end generated: t -->\nb\n")
    replace_block(doc, "t", "| x |\n")
    assert read_block(doc, "t") == "| x |\n"
    assert doc.read_text().startswith("a\n") and doc.read_text().endswith("b\n")
    with pytest.raises(ValueError, match="markers"):
        replace_block(doc, "missing", "x")
