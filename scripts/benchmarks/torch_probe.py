"""probe: the spread of torch's trunk at batch 1 with 1 thread and with --threads. On a shared
machine OpenMP's spinning barriers can make the multi-threaded run much slower and bimodal,
which would overstate JAX's lead in the tables timed around it."""

from __future__ import annotations

import statistics

import harness
from harness import FLAGS, Table


def run() -> list[Table]:
    torch = harness.torch_threads()
    tmodel, _ = harness.models()
    x = torch.from_numpy(harness.images(1).transpose(0, 3, 1, 2).copy())

    def trunk():
        return harness.torch_trunk(tmodel, x)

    table = Table("torch sensitivity to co-running load: trunk to layer3, batch 1, s per call",
                  ["torch threads", "min", "median", "max"])
    medians = {}
    for threads in sorted({1, FLAGS.threads}):
        torch.set_num_threads(threads)
        trunk()
        (times,) = harness.timed([trunk], 6, FLAGS.budget_s)
        table.add(threads, min(times), statistics.median(times), max(times))
        medians[threads] = statistics.median(times), max(times) / min(times)
    torch.set_num_threads(FLAGS.threads)
    (one, _), (many, spread) = medians[1], medians[FLAGS.threads]
    disturbed = spread > 2 or many > 1.5 * one
    table.notes.append(
        f"at the time of this probe: {FLAGS.threads} threads took {many / one:.2f}x the time of "
        f"1 thread, max/min {spread:.1f}. " + (
            "More threads being slower, or a large spread, means torch's OpenMP threads waited "
            "on each other at barriers while other processes held the cores; torch timings "
            "taken in such a phase overstate JAX's lead (JAX's work-stealing pool suffers "
            "less). Rerun on an idle machine for clean ratios." if disturbed else
            "torch was not visibly disturbed by other load at that time."))
    return [table.print()]
