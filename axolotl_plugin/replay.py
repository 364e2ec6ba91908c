"""Replay for an Axolotl stage: mix a seeded sample of earlier stages' preference data into this stage's data.

Both parts go through Axolotl's own preference pipeline (`prepare_preference_datasets`: dataset types, chat
templates, length filtering, caching), so replayed rows are formatted exactly like this stage's rows.
"""

from __future__ import annotations

import math


def replay_row_count(current_rows: int, available_rows: int, fraction: float, capacity: int | None) -> int:
    """Rows to replay: `fraction × current_rows`, bounded by the capacity and by what the earlier stages hold."""
    wanted = round(fraction * current_rows)
    if capacity is not None:
        wanted = min(wanted, capacity)
    return min(wanted, available_rows)


def load_with_replay(cfg):
    """(`TrainDatasetMeta` of this stage's data plus the replay sample, shuffled with the replay seed; replayed rows)."""
    from axolotl.common.datasets import TrainDatasetMeta
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.rl import prepare_preference_datasets
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import DPODataset
    from datasets import concatenate_datasets

    tokenizer = load_tokenizer(cfg)
    train_dataset, eval_dataset = prepare_preference_datasets(cfg, tokenizer)

    replay_entries = []
    for index, entry in enumerate(cfg.lifealign_replay_datasets):
        try:
            replay_entries.append(DictDefault(DPODataset(**dict(entry)).model_dump(exclude_none=True)))
        except Exception as error:
            raise ValueError(f"lifealign_replay_datasets[{index}] is not a valid DPO dataset entry: {error}") from error
    replay_cfg = DictDefault(dict(cfg))
    replay_cfg["datasets"] = replay_entries
    replay_cfg["test_datasets"] = None
    replay_cfg["val_set_size"] = 0.0
    replay_pool, _ = prepare_preference_datasets(replay_cfg, tokenizer)

    count = replay_row_count(
        len(train_dataset), len(replay_pool), cfg.lifealign_replay_fraction, cfg.lifealign_replay_capacity
    )
    seed = cfg.lifealign_replay_seed
    if count:
        sample = replay_pool.shuffle(seed=seed).select(range(count))
        train_dataset = concatenate_datasets([train_dataset, sample]).shuffle(seed=seed)
    total_num_steps = int(math.ceil(len(train_dataset) * cfg.num_epochs / cfg.batch_size))
    meta = TrainDatasetMeta(train_dataset=train_dataset, eval_dataset=eval_dataset, total_num_steps=total_num_steps)
    return meta, count
