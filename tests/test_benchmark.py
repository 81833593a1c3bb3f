"""The benchmark harness (scripts/benchmarks/harness.py): tables, alternating timers, fresh-process
cases.

The measurements themselves are checked by running them at tiny sizes (the docstring of
scripts/benchmarks/benchmark.py has the command); these tests cover the shared parts they all
rely on.
"""

import pathlib
import sys

import numpy as np
import pytest
from absl import flags

# The measurement modules import each other by name, as a script's own folder on sys.path allows.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"))
import cluster
import harness

from protoad_jax.clustering import finch


@pytest.fixture(autouse=True)
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def test_table_markdown_round_trip():
    table = harness.Table("t", ["a", "b", "c"])
    rows = [(1, 0.123456, None), ("x", 1234.5, 2.0)]
    for row in rows:
        table.add(*row)
    table.notes.append("a note")
    lines = table.markdown().splitlines()
    assert lines[:4] == ["### t", "", "| a | b | c |", "|---|---|---|"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:6]]
    # Independent formatting rule: 3 significant digits below 100, else rounded; None -> dash.
    want = [["1", f"{0.123456:.3g}", "—"], ["x", f"{round(1234.5):d}", f"{2.0:.3g}"]]
    print("cells", cells, "want", want)
    assert cells == want
    assert lines[6:] == ["", "- a note"]


def test_timed_alternates_and_stops_at_budget():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = harness.timed(fns, repeats=4)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times] == [4, 4]
    calls.clear()
    times = harness.timed(fns, repeats=10, budget_s=0.0)  # budget passed: stop after 2 rounds
    assert calls == ["a", "b"] * 2 and [len(t) for t in times] == [2, 2]


def test_run_case_matches_in_process_call():
    """A clustering case in a fresh process reports what the same call reports in this one."""
    spec = {"method": "finch", "n": 60, "k": 4, "dtype": "float32", "iters": 2, "repeats": 1}
    got = harness.run_case("cluster", spec)
    assert "error" not in got, got.get("error")
    x = cluster._clustered(spec["n"], spec["k"], np.dtype(spec["dtype"]))
    want = finch.finch(x, num_clusters=spec["k"])
    print("child", got["levels"], got["required_level"], "here", want.num_clusters,
          want.required_level)
    assert got["levels"] == want.num_clusters and got["required_level"] == want.required_level
    assert got["data_mb"] == pytest.approx(x.nbytes / 2**20)
    assert 0 < got["runtime_mb"] <= got["peak_mb"] and got["warm_s"] is not None
    assert {k: got[k] for k in spec} == spec


def test_run_case_reports_child_failure():
    got = harness.run_case("no_such_measurement", {"n": 1})
    print(got)
    assert got["n"] == 1 and "exit 1" in got["error"] and "no_such_measurement" in got["error"]
