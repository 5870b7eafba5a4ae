"""Replay: mix a share of the old behaviour's data into the fine-tuning data, the baseline every anti-forgetting
regularizer is compared with (it needs old data, as EWC's Fisher does, but no change to the trainer).

    train = mix_replay(new_task, old_behaviour, share=0.2, seed=0)   # 20 % of the rows are old ones
"""

from datasets import Dataset, concatenate_datasets


def mix_replay(dataset: Dataset, old: Dataset, share: float, seed: int = 0) -> Dataset:
    """``dataset`` plus rows of ``old`` making up ``share`` of the result, shuffled together with ``seed``. The old
    rows are taken in a seeded order and cycled when more are needed than there are. Only the columns both datasets
    have are kept; they must include an SFT format (prompt/completion, messages or text)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"The replay share is a fraction of the mixed data in [0, 1), got {share}.")
    if share == 0.0:
        return dataset
    if len(old) == 0:
        raise ValueError("Replay needs old-behaviour rows; the old dataset is empty.")
    common = [column for column in dataset.column_names if column in old.column_names]
    if not ({"prompt", "completion"} <= set(common) or "messages" in common or "text" in common):
        raise ValueError(f"The old-behaviour data and the training data share no SFT format (prompt/completion, "
                         f"messages or text): training columns {dataset.column_names}, old {old.column_names}.")
    count = round(share * len(dataset) / (1.0 - share))
    order = old.shuffle(seed=seed)
    replayed = order.select([i % len(order) for i in range(count)]).select_columns(common)
    return concatenate_datasets([dataset.select_columns(common), replayed]).shuffle(seed=seed)
