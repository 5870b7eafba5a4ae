"""The claims scripts' shared parts (benchmarks/claims/common.py): the standard error they report, and running arms
(skipping finished ones, stopping with the failed one's log). The scripts themselves take tens of minutes on the real
model; their tables come from ``python benchmarks/claims/<method>.py`` (docs/<method>.md says which run)."""

import math
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "claims"))
import common


def test_mean_and_standard_error_by_hand():
    mean, se = common.mean_se([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(7.0) / math.sqrt(3.0))  # sample variance (4 + 1 + 9) / 2 = 7
    assert common.fmt([1.0, 2.0, 6.0], 2) == "3.00 ± 1.53"
    assert math.isnan(common.mean_se([5.0])[1]) and common.fmt([5.0], 1) == "5.0"  # one seed: no error bar


def test_run_arms_skips_finished_runs_runs_the_rest_and_stops_on_a_failure(tmp_path):
    def arm(name, code, done):
        return {"name": name, "command": ["-c", code], "log": tmp_path / f"{name}.log", "done": tmp_path / done}

    (tmp_path / "a.done").write_text("finished before")
    write_b = f"open({str(tmp_path / 'b.done')!r}, 'w').write('ok')"
    common.run_arms([arm("a", "raise SystemExit(3)", "a.done"), arm("b", write_b, "b.done")], jobs=2)
    assert (tmp_path / "a.done").read_text() == "finished before"  # not rerun (it would have failed)
    assert (tmp_path / "b.done").read_text() == "ok"
    with pytest.raises(SystemExit, match=r"c failed \(exit 3\)[\s\S]*the reason"):
        common.run_arms([arm("c", "import sys; print('the reason'); sys.exit(3)", "c.done")], jobs=1)
