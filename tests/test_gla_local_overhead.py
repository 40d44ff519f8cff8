"""benchmarks.gla_local_overhead runs on CPU (the PyTorch operator as the reference) and writes its rows."""
import json

import pytest

from longseq.benchmarks import gla_local_overhead


def test_cpu_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert gla_local_overhead.main(["--device", "cpu", "--tokens", "40", "--heads", "1", "--head-k", "8",
                                    "--head-v", "8", "--dtypes", "fp32", "--repeats", "2", "--warmup", "1",
                                    "--world", "3", "--json", str(out)]) == 0
    blob = json.loads(out.read_text())
    assert [(r["decay"], r["T"], r["P"]) for r in blob["results"]] == [("per-key", 40, 3), ("scalar", 40, 3)]
    for res in blob["results"]:
        names = [row["name"] for row in res["rows"]]
        assert names[0].startswith("zeco.gla torch backend") and len(names) == 7
        assert {"sp_gla zeco rank 1/3", "sp_gla zeco rank 0/3", "sp_gla zeco rank 2/3", "sp_gla lasp2 rank 1/3",
                "sp_gla zeco rank 1/3 overlap=False"} <= set(names)
        assert res["rows"][0]["ratio"] == 1.0
        for row in res["rows"]:
            assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0
            assert row["ratio"] == pytest.approx(row["total_ms"] / res["rows"][0]["total_ms"])
    assert "| sp_gla zeco rank 1/3" in capsys.readouterr().out


def test_world_below_three_is_refused():
    with pytest.raises(SystemExit):
        gla_local_overhead.main(["--device", "cpu", "--world", "2"])
