"""fva_jax.data.pipeline as the trainer gets it, with a record of every step it reads.

`train.train_and_evaluate(..., data=recorded_pipeline)` (or tests/run_main.py with
FVA_RECORD_DATA_STEPS=1) reads the real data set through the real pipeline; each step's
batch, as it leaves the pipeline, is recorded as

  (split, mode, epoch, step, shape of "video", video index of each row (-1: empty slot),
   valid frames of each row, label of each row)

with the video indices from the pipeline's own plan (the batch carries no indices): tests
check the recorded frames and labels against the data set's lengths and labels, so a record
whose indices did not match its batch would fail. Records are appended to `STEP_LOG` (this
process) and logged as "DATA_STEP {json}" lines (for runs in other processes).
"""

from __future__ import annotations

import json
from typing import Iterator

from absl import logging

from fva_jax.data import pipeline

STEP_LOG: list[tuple] = []

dataset_info = pipeline.dataset_info


def _record(split: str, mode: str, epoch: int, step: int, rows, batch: dict) -> None:
    record = (
        split,
        mode,
        epoch,
        step,
        tuple(int(n) for n in batch["video"].shape),
        tuple(int(v) for v in rows),
        tuple(int(n) for n in batch["mask"].sum(1)),
        tuple(int(y) for y in batch["label"]),
    )
    STEP_LOG.append(record)
    logging.info("DATA_STEP %s", json.dumps(record))


def _process_index(process_index) -> int:
    if process_index is None:
        import jax  # pylint: disable=g-import-not-at-top

        return jax.process_index()
    return int(process_index)


class TrainData(pipeline.TrainData):
    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config,
            process_index=process_index,
            process_count=process_count,
            local_device_count=local_device_count,
        )
        self.process_index = _process_index(process_index)

    def iterator(self, mode: str, *, epoch: int, start_step: int = 0) -> Iterator[dict]:
        plan = self.plan(mode, epoch)
        batches = super().iterator(mode, epoch=epoch, start_step=start_step)
        for step, batch in enumerate(batches, start_step):
            _record("train", mode, epoch, step, plan.rows(step, self.process_index), batch)
            yield batch


class EvalData(pipeline.EvalData):
    def __init__(self, config, *, process_index=None, process_count=None, local_device_count=None):
        super().__init__(
            config,
            process_index=process_index,
            process_count=process_count,
            local_device_count=local_device_count,
        )
        self.process_index = _process_index(process_index)

    def iterator(self, mode: str) -> Iterator[dict]:
        plan = self.plan(mode)
        for step, batch in enumerate(super().iterator(mode)):
            _record("test", mode, 0, step, plan.rows(step, self.process_index), batch)
            yield batch
