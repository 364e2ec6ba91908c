"""Replay for an Axolotl stage, with the rule of `lifealign train` (`trl_lifealign.lifelong.replay`): a seeded random
`lifealign_replay_fraction` of each earlier stage's rows enters a FIFO buffer of `lifealign_replay_capacity` rows, and
the buffer is mixed into this stage's data.

Every part goes through Axolotl's own preference pipeline (`prepare_preference_datasets`: dataset types, chat
templates, length filtering, caching), so replayed rows are formatted exactly like this stage's rows.
"""

from __future__ import annotations

import math

from trl_lifealign.lifelong.replay import replay_plan

from .args import replay_stages


def _stage_dataset(cfg, tokenizer, index: int, stage: dict):
    """One earlier stage's rows, prepared by Axolotl like a stage's own training data."""
    from axolotl.utils.data.rl import prepare_preference_datasets
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import DPODataset

    entries = []
    for position, entry in enumerate(stage["datasets"]):
        try:
            entries.append(DictDefault(DPODataset(**dict(entry)).model_dump(exclude_none=True)))
        except Exception as error:
            raise ValueError(f"lifealign_replay_stages[{index}] ({stage['name']}) datasets[{position}] is not a valid "
                             f"DPO dataset entry: {error}") from error
    stage_cfg = DictDefault(dict(cfg))
    stage_cfg["datasets"], stage_cfg["test_datasets"], stage_cfg["val_set_size"] = entries, None, 0.0
    dataset, _ = prepare_preference_datasets(stage_cfg, tokenizer)
    return dataset


def load_with_replay(cfg):
    """(`TrainDatasetMeta` of this stage's data plus the replay buffer, shuffled with the replay seed; the number of
    replayed rows)."""
    from axolotl.common.datasets import TrainDatasetMeta
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.rl import prepare_preference_datasets
    from datasets import concatenate_datasets

    tokenizer = load_tokenizer(cfg)
    train_dataset, eval_dataset = prepare_preference_datasets(cfg, tokenizer)
    earlier = [_stage_dataset(cfg, tokenizer, i, stage) for i, stage in enumerate(replay_stages(cfg))]
    plan = replay_plan([len(d) for d in earlier], cfg.lifealign_replay_fraction, cfg.lifealign_replay_capacity,
                       cfg.lifealign_replay_seed)
    if plan:
        parts = [earlier[task].select([row for t, row in plan if t == task]) for task in sorted({t for t, _ in plan})]
        train_dataset = concatenate_datasets([train_dataset, *parts]).shuffle(seed=cfg.lifealign_replay_seed)
    total_num_steps = int(math.ceil(len(train_dataset) * cfg.num_epochs / cfg.batch_size))
    meta = TrainDatasetMeta(train_dataset=train_dataset, eval_dataset=eval_dataset, total_num_steps=total_num_steps)
    return meta, len(plan)
