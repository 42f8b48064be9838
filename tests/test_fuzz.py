"""Issue 11's fuzz in the default run: random byte changes in every kind of file the trainer trusts (tests/bench/fuzz.py
has the trials and more of them with --trials). Every trial ends in a verify report or a one-line error naming the
file, or changes nothing training uses; never in a silent change of a label, a pixel or a checkpoint, or a crash."""
from __future__ import annotations

from bench.fuzz import KINDS, fuzz, make_inputs, table

TRIALS = 12  # per kind of file: 72 trials in all, a few seconds (the README's counts are from the script)


def test_no_byte_change_goes_unnoticed(tmp_path):
    data, run = make_inputs(tmp_path)
    counts = fuzz(data, run, TRIALS, seed=11)
    examples = counts.pop("examples")
    print(table(counts))
    for kind in KINDS:
        c = counts[kind]
        assert sum(c.values()) == TRIALS, kind
        assert c["SILENT"] == 0 and c["crash"] == 0, (kind, {k: v for k, v in examples.items() if k[0] == kind})
        # most changes are caught; "no effect" is a change nothing reads (JSON whitespace, a manifest field)
        assert c["verify"] + c["error"] >= TRIALS // 2, (kind, c)
