"""The data sets fva_jax trains on, as TFDS builders: the lookup by name, and building.

Registered names: sparse_events (procedural, no download; `SparseEvents` here), breakfast,
hmdb51, ucf101, something_something_v1, something_something_v2 (read from `manual_dir`,
laid out as the official downloads unpack; `official_sets.py`, docs/DATASETS.md).
`get_builder(name, config, data_dir)` makes one; `prepare(builder, manual_dir)` builds it if
its data_dir does not hold it yet and writes its frame index (`records.py`).

What a built data set stores (whole videos as JPEG frames in ArrayRecord files, builder
version 2.0.0) is `builder_base.py`'s; `records.py` reads it without TensorFlow. A data_dir
holding only a version-1.0.0 build (TFRecord, tfds.features.Video) must be rebuilt; `prepare`
says how when it cannot rebuild by itself. Building may import TensorFlow (TFDS uses it for
splits over 1 GB); reading never does.

`ucf101` is not put into TFDS's global registry because TFDS ships a download-based
builder of that name; use `get_builder_class("ucf101")` or `python -m fva_jax.data.build`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fva_jax.data import official_sets, records
from fva_jax.data import sparse_events as se
from fva_jax.data.builder_base import (
    FILE_FORMAT,
    RELEASE_NOTES,
    VERSION,
    Builder,
    MissingDataError,
    video_features,
)
from fva_jax.data.video import encode_jpegs


@dataclasses.dataclass(eq=False)
class SparseEventsConfig(tfds.core.BuilderConfig):
    """Config of `sparse_events`: the generator spec and JPEG quality."""

    spec: se.SparseEventsSpec = dataclasses.field(default_factory=se.SparseEventsSpec)
    jpeg_quality: int = 90


# --------------------------------------------------------------------------- sparse_events


class SparseEvents(Builder):
    """Procedural videos whose class shows in only a few frames (see sparse_events.py)."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    BUILDER_CONFIGS = [
        SparseEventsConfig(
            name="default",
            description="1000 train / 250 test videos, "
            "48-256 frames, 64x64, 4-frame events, 6 classes.",
        ),
        SparseEventsConfig(
            name="small",
            description="256 / 64 videos, 48-128 frames.",
            spec=se.SparseEventsSpec(num_train=256, num_test=64, max_frames=128),
        ),
        SparseEventsConfig(
            name="tiny",
            description="For tests: 12 / 6 videos, 12-24 frames, 32x32, 3-frame events, 4 classes.",
            spec=se.SparseEventsSpec(
                num_classes=4,
                num_train=12,
                num_test=6,
                min_frames=12,
                max_frames=24,
                size=32,
                event_frames=3,
            ),
        ),
        SparseEventsConfig(
            name="long",
            description="Breakfast-like lengths: 128 / 32 videos of 300-9,000 frames "
            "(lognormal, mean 2,400), 32x32, 4-frame events, 6 classes (~0.4 M frames).",
            spec=se.LONG_SPEC,
        ),
        SparseEventsConfig(
            name="long_slice",
            description="The first 24 train / 6 test videos of `long` (the same videos), "
            "for benchmarks.",
            spec=dataclasses.replace(se.LONG_SPEC, num_train=24, num_test=6),
        ),
        SparseEventsConfig(
            name="long_tiny",
            description="For tests: `long` scaled down 32x in time, 16 / 8 videos of 10-280 "
            "frames (lognormal, mean 75), 32x32, 3-frame events, 4 classes.",
            spec=se.LONG_TINY_SPEC,
        ),
    ]

    def __init__(self, *, skip_corrupt: bool = False, num_workers: int | None = None, **kwargs):
        del skip_corrupt, num_workers  # Nothing to decode; same signature as the others.
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        return self.dataset_info_from_configs(
            description=SparseEvents.__doc__,
            features=video_features(
                tfds.features.ClassLabel(names=se.class_names(spec.num_classes)),
                frame_shape=(spec.size, spec.size, 3),
                event_start=tfds.features.Scalar(np.int32),
            ),
            supervised_keys=("video", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        spec = self.builder_config.spec
        return {
            "train": self._generate_examples("train", spec.num_train),
            "test": self._generate_examples("test", spec.num_test),
        }

    def _generate_examples(self, split, n):
        spec, q = self.builder_config.spec, self.builder_config.jpeg_quality
        for i in range(n):
            v = se.make_video(spec, split, i)
            vid = f"{split}/{i:06d}"
            example = {
                "video": encode_jpegs(v["video"], q),
                "num_frames": v["num_frames"],
                "label": v["label"],
                "video_id": vid,
                "event_start": v["event_start"],
            }
            records.check_video(vid, example["num_frames"], len(example["video"]), self.name)
            yield vid, example


# --------------------------------------------------------------------------- lookup

BUILDERS: dict[str, type] = {
    "sparse_events": SparseEvents,
    "breakfast": official_sets.Breakfast,
    "ucf101": official_sets.Ucf101,
    "hmdb51": official_sets.Hmdb51,
    "something_something_v1": official_sets.SomethingSomethingV1,
    "something_something_v2": official_sets.SomethingSomethingV2,
}


def get_builder_class(name: str) -> type:
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def get_builder(
    name: str,
    builder_config: str = "",
    data_dir: str = "",
    *,
    skip_corrupt: bool = False,
    num_workers: int | None = None,
) -> tfds.core.DatasetBuilder:
    """The builder `name` with config `builder_config` ("" = the first) in `data_dir`."""
    cls = get_builder_class(name)
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    config = builder_config or configs[0]
    if config not in configs:
        raise ValueError(
            f"{name} has no builder config {builder_config!r}; choose from {', '.join(configs)}"
        )
    return cls(
        config=config, data_dir=data_dir or None, skip_corrupt=skip_corrupt, num_workers=num_workers
    )


def prepare(builder, manual_dir: str = "") -> None:
    """Builds `builder` if its data_dir does not hold it yet (reads manual_dir), then writes
    its frame index if missing.

    Raises MissingDataError saying how to rebuild when the data_dir holds only an older
    version of the data set and the official download is not there to rebuild it from.
    """
    if not builder.is_prepared():
        old = older_versions(builder)
        if old:
            logging.warning(
                "%s: found version(s) %s, which this fva_jax cannot read; building %s",
                _variant_dir(builder),
                ", ".join(old),
                builder.version,
            )
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None),
                file_format=FILE_FORMAT,
            )
        except MissingDataError as e:
            if not old:
                raise
            raise MissingDataError(
                f"{_variant_dir(builder)} holds only version(s) {', '.join(old)} of "
                f"{builder.name}/{builder.builder_config.name}, written by an older fva_jax "
                f"in a format this version cannot read (TFRecord files with "
                f"tfds.features.Video frames, which need TensorFlow). Rebuild it as version "
                f"{builder.version} (the old folder can then be deleted):\n"
                f"  python -m fva_jax.data.build --name={builder.name} "
                f"--config={builder.builder_config.name} --data_dir={builder.data_dir_root} "
                f"--manual_dir=<the unpacked official download>\n"
                f"({e})"
            ) from e
    if not (epath.Path(builder.data_dir) / records.FRAME_INDEX).exists():
        records.write_frame_index(builder)


def _variant_dir(builder) -> epath.Path:
    return epath.Path(builder.data_dir).parent


def older_versions(builder) -> list[str]:
    """Versions below the builder's that are built in its data_dir (e.g. ["1.0.0"])."""
    root = _variant_dir(builder)
    if not root.exists():
        return []
    found = []
    for d in root.iterdir():
        try:
            version = tfds.core.Version(d.name)
        except ValueError:
            continue
        if version < builder.version and (d / "dataset_info.json").exists():
            found.append(d.name)
    return sorted(found)
