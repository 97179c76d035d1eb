"""fva_jax.data.pipeline as the trainer gets it, with a record of every step it reads.

`train.train_and_evaluate(..., data=recorded_pipeline)` (or tests/run_main.py with
FVA_RECORD_DATA_STEPS=1) reads the real data set through the real pipeline; each step's
batch, as it leaves the pipeline, is recorded as

  (split, mode, epoch, step, shape of "video", video index of each row (-1: empty slot),
   valid frames of each row, label of each row)

with the video indices the batch itself carries (its "index": each row's record's video_id
looked up in the split, not the plan's rows), so tests check which videos were read
independently of the plan, and check the recorded frames and labels against the data set's
lengths and labels. Records are appended to `STEP_LOG` (this process) and logged as
"DATA_STEP {json}" lines (for runs in other processes).
"""

from __future__ import annotations

import json
from typing import Iterator

from absl import logging

from fva_jax.data import pipeline

STEP_LOG: list[tuple] = []

dataset_info = pipeline.dataset_info


def _record(split: str, mode: str, epoch: int, step: int, batch: dict) -> None:
    record = (
        split,
        mode,
        epoch,
        step,
        tuple(int(n) for n in batch["video"].shape),
        tuple(int(v) for v in batch["index"]),
        tuple(int(n) for n in batch["mask"].sum(1)),
        tuple(int(y) for y in batch["label"]),
    )
    STEP_LOG.append(record)
    logging.info("DATA_STEP %s", json.dumps(record))


class TrainData(pipeline.TrainData):
    def iterator(self, mode: str, *, epoch: int, start_step: int = 0) -> Iterator[dict]:
        batches = super().iterator(mode, epoch=epoch, start_step=start_step)
        for step, batch in enumerate(batches, start_step):
            _record("train", mode, epoch, step, batch)
            yield batch


class EvalData(pipeline.EvalData):
    def iterator(self, mode: str) -> Iterator[dict]:
        for step, batch in enumerate(super().iterator(mode)):
            _record("test", mode, 0, step, batch)
            yield batch
