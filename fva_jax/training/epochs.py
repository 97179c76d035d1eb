"""The sequence of training epochs: which mode each trains in, and at which step it starts.

An epoch is one pass over the training videos. Epoch e trains on K host-chosen frames per
video (mode "sampled") while e < config.train.uniform_warmup_epochs, or always when
config.model.sampling is not "cluster"; otherwise on full videos (mode "full"). The two
modes have different numbers of steps per epoch (sampled steps hold train.batch_size videos;
full-video steps as many as fit data.frames_per_device), so an epoch's first step is the sum
of the earlier epochs' steps, and learning-rate settings given in epochs are converted with
`EpochPlan.epoch_to_step`: epoch x = e + f (0 <= f < 1) is step first_step(e) + f * steps(e).

Training lasts config.train.num_epochs epochs (a fraction trains the first part, rounded up,
of the last one), or exactly config.train.num_train_steps steps when that is > 0 (the epoch
sequence is then cut, or continued in the mode rule, at that step).
"""

import dataclasses
import math
from typing import Mapping

import ml_collections

MODES = ("sampled", "full")


@dataclasses.dataclass(frozen=True)
class Epoch:
    """index: epoch number; mode: "sampled" | "full"; first_step: global steps before it;
    num_steps: steps trained in it (fewer than steps_per_epoch only in a cut last epoch);
    steps_per_epoch: steps of the whole epoch in its mode."""

    index: int
    mode: str
    first_step: int
    num_steps: int
    steps_per_epoch: int


class EpochPlan:
    """Epochs of one training run.

    Args:
      steps_per_mode: global steps of one epoch in each mode ({"sampled": n, "full": m};
        only the modes that occur are needed).
      warmup_epochs: whole epochs trained in mode "sampled" first.
      full_video: False when every epoch is sampled (model.sampling "uniform" / "dense").
      num_epochs: length in epochs (used when num_train_steps <= 0).
      num_train_steps: > 0: length in steps instead.
    """

    def __init__(
        self,
        *,
        steps_per_mode: Mapping[str, int],
        warmup_epochs: int,
        full_video: bool,
        num_epochs: float,
        num_train_steps: int = -1,
    ):
        self._steps_per_mode = dict(steps_per_mode)
        self._warmup = int(warmup_epochs)
        self._full_video = bool(full_video)
        for mode in {self.mode(0), self.mode(self._warmup)}:
            if self._steps_per_mode.get(mode, 0) < 1:
                raise ValueError(f"an epoch in mode {mode!r} has no steps: {steps_per_mode}")
        epochs, step, e = [], 0, 0
        if num_train_steps > 0:
            while step < num_train_steps:
                size = self.steps_per_epoch(e)
                n = min(size, num_train_steps - step)
                epochs.append(Epoch(e, self.mode(e), step, n, size))
                step, e = step + n, e + 1
        else:
            while e < num_epochs:
                size = self.steps_per_epoch(e)
                n = size if e + 1 <= num_epochs else max(1, math.ceil((num_epochs - e) * size))
                epochs.append(Epoch(e, self.mode(e), step, n, size))
                step, e = step + n, e + 1
        self.epochs: tuple[Epoch, ...] = tuple(epochs)
        self.total_steps: int = step

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, steps_per_mode: Mapping[str, int]
    ) -> "EpochPlan":
        return cls(
            steps_per_mode=steps_per_mode,
            warmup_epochs=int(config.train.uniform_warmup_epochs),
            full_video=config.model.sampling == "cluster",
            num_epochs=float(config.train.num_epochs),
            num_train_steps=int(config.train.num_train_steps),
        )

    @staticmethod
    def modes_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The modes a run of `config` trains in, in order."""
        if config.model.sampling != "cluster":
            return ("sampled",)
        return ("sampled", "full") if config.train.uniform_warmup_epochs > 0 else ("full",)

    def mode(self, epoch: int) -> str:
        return "sampled" if epoch < self._warmup or not self._full_video else "full"

    def steps_per_epoch(self, epoch: int) -> int:
        return self._steps_per_mode[self.mode(epoch)]

    def first_step(self, epoch: int) -> int:
        """Global steps before `epoch` (also past the trained epochs, by the mode rule)."""
        return sum(self.steps_per_epoch(e) for e in range(epoch))

    def epoch_to_step(self, epochs: float) -> int:
        """The step at which `epochs` (a possibly fractional epoch count) is reached."""
        whole = math.floor(epochs)
        return int(round(self.first_step(whole) + (epochs - whole) * self.steps_per_epoch(whole)))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of the next batch after `step` completed steps."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step {step} is outside this run's 0..{self.total_steps} steps")
        for epoch in self.epochs:
            if step < epoch.first_step + epoch.num_steps:
                return epoch.index, step - epoch.first_step
        last = self.epochs[-1]
        return last.index, last.num_steps

    def describe(self) -> str:
        """e.g. "2 sampled epochs (3 steps each), then 2 full epochs (5 steps each)"."""
        parts, i = [], 0
        while i < len(self.epochs):
            j = i
            while j < len(self.epochs) and self.epochs[j].mode == self.epochs[i].mode:
                j += 1
            group = self.epochs[i:j]
            cut = group[-1].num_steps < group[-1].steps_per_epoch
            parts.append(
                f"{len(group)} {group[0].mode} epoch{'s' if len(group) > 1 else ''} "
                f"({group[0].steps_per_epoch} steps each"
                + (f", the last cut to {group[-1].num_steps}" if cut else "")
                + ")"
            )
            i = j
        return ", then ".join(parts)
