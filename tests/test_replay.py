"""mix_replay (llmreg/replay.py): the share of old rows, every old row used before any repeats, determinism, and the
errors."""

import pytest
from datasets import Dataset

from llmreg.replay import mix_replay


def rows(prefix, n, **extra):
    return Dataset.from_dict({"prompt": [f"{prefix}{i}" for i in range(n)], "completion": ["c"] * n,
                              **{k: [v] * n for k, v in extra.items()}})


def test_the_old_rows_make_up_the_share_and_are_cycled_evenly():
    mixed = mix_replay(rows("new", 80, answer="1"), rows("old", 7, value="x"), share=0.2, seed=3)
    assert len(mixed) == 100 and mixed.column_names == ["prompt", "completion"]  # 20 old rows: 80 / 0.8 − 80
    old = [p for p in mixed["prompt"] if p.startswith("old")]
    assert len(old) == 20 and {old.count(f"old{i}") for i in range(7)} == {2, 3}  # 20 = 2·7 + 6: cycled evenly
    assert sorted(p for p in mixed["prompt"] if p.startswith("new")) == sorted(f"new{i}" for i in range(80))
    assert mixed["prompt"][:20] != sorted(mixed["prompt"])[:20]  # shuffled together
    assert mix_replay(rows("new", 80), rows("old", 7), share=0.2, seed=3)["prompt"] == mixed["prompt"]


def test_share_zero_is_the_dataset_and_bad_input_is_refused():
    new = rows("new", 5)
    assert mix_replay(new, rows("old", 3), share=0.0) is new
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mix_replay(new, rows("old", 3), share=1.0)
    with pytest.raises(ValueError, match="share no SFT format"):
        mix_replay(new, Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]}), share=0.5)
