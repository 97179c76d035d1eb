"""The one place where the experiment config is declared and checked.

`default_config()` declares every field the trainer, the model and the data pipeline read,
with the paper's recipe as defaults (docs/DESIGN.md §1). Each `configs/<name>.py` starts from it
and only overrides. `validate_config()` runs before any work and raises `ConfigError` with a
message that names the offending field, e.g.
``config.model.num_clusters must be >= 1, got 0``.

Layout (all fields, see `default_config` for meanings):
  config.seed, config.fast_compile, config.compilation_cache_dir
  config.data.*          the data pipeline's fields (fva_jax/data/pipeline.py)
  config.model.*         exactly the fields of FullVideoModel except num_classes
  config.train.*         batch size, length, uniform-sampling warm-up, logging cadence
  config.optim.*         optimizer, weight decay, clipping, classifier learning-rate multipliers
  config.schedule.*      learning-rate schedule
  config.checkpoint.*    orbax CheckpointManager cadence and retention
  config.eval.*          evaluation batch size, cadence, uniform-sampling comparison
  config.distributed.*   multi-host initialisation (jax.distributed)

Over 400 lines on purpose: every field's default, meaning and check live in this one module,
so that one file answers what a field is and which values it takes.
`RESUMABLE_FIELDS` lists, with the reason, the fields a resumed run may change; the others
(`run_settings`) are stored in each checkpoint and compared on resume (`compare_for_resume`).
This module imports only ml_collections and the standard library, so configs load fast.
The names a field may take are defined once, where they are implemented: backbones and
cluster points in `fva_jax.models.resnet`, samplings and memory plans in
`fva_jax.models.full_video`, clustering methods in `fva_jax.clustering.SEGMENTERS`;
`validate_config` imports them when it runs (`allowed_names()`). Data set names stay here
(`DATASETS`): their builders need TensorFlow Datasets, and a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any

import ml_collections

# The registered names of fva_jax.data.builders.BUILDERS (tests/test_config.py keeps them equal).
DATASETS = (
    "sparse_events",
    "breakfast",
    "ucf101",
    "hmdb51",
    "something_something_v1",
    "something_something_v2",
)
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DISTRIBUTED_MODES = ("auto", "always", "never")


class ConfigError(ValueError):
    """A config field has a wrong name or a bad value; the message names the field.

    field: the field's dotted name without "config." (e.g. "model.num_clusters"), if known.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def allowed_names() -> dict[str, tuple[str, ...]]:
    """Field -> the names it may take, each list from the module that implements them.

    Imported here, not at the top: the configs then load without JAX and Flax, and a module
    that only reads configs (e.g. the data pipeline) does not pull in the models.
    """
    from fva_jax import clustering  # pylint: disable=g-import-not-at-top
    from fva_jax.models import full_video, resnet  # pylint: disable=g-import-not-at-top

    return {
        "data.name": DATASETS,
        "model.backbone": resnet.BACKBONES,
        "model.sampling": full_video.SAMPLINGS,
        "model.cluster_method": clustering.METHODS,
        "model.cluster_point": resnet.CLUSTER_POINTS,
        "model.dtype": DTYPES,
        "model.plan": full_video.PLANS,
    }


def default_config() -> ml_collections.ConfigDict:
    """Every field, with the paper's recipe (TSM-R50, K=16, 224 px, SGD) as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Compile with XLA's backend optimisation level 0: about 3x faster compilation on CPU but
    # slower steps. For tests and debugging only.
    c.fast_compile = False
    # JAX's persistent compilation cache: every step shape (one per length bucket) compiles
    # once and a restarted run reuses the compiled programs. "" = WORKDIR/compilation_cache,
    # "off" = no cache; an explicit JAX_COMPILATION_CACHE_DIR (environment) wins over both.
    c.compilation_cache_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "sparse_events"
    c.data.builder_config = ""  # "" = the builder's default config (e.g. "s1", "split1")
    c.data.data_dir = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
    c.data.manual_dir = ""  # where the official download was unpacked; "" = TFDS default
    c.data.train_split = "train"
    c.data.eval_split = "test"
    # Frames after the stride kept per video: 0 = no cap (every frame; the default). A cap > 0
    # drops the end of longer videos: only by explicit choice.
    c.data.max_frames = 0
    c.data.frame_stride = 1
    c.data.resize_short = 256  # shorter side after decoding, before cropping
    c.data.crop_size = 224
    c.data.crop_scales = (1.0, 0.875, 0.75, 0.66)  # TSM multi-scale crop
    c.data.hflip = True
    # A video that cannot be decoded stops the build (the trainer's automatic build and
    # `python -m fva_jax.data.build` alike), naming it: a set with videos left out is not the
    # official set. True skips such videos and prints how many and which.
    c.data.skip_corrupt = False
    # Full-video steps are planned from the videos' lengths (fva_jax/data/batch_plan.py):
    # videos grouped into length buckets (padded lengths, multiples of model.chunk_size), a
    # step holding max(1, frames_per_device // bucket) videos per device (a video longer than
    # the budget gets one video per device).
    c.data.frames_per_device = 4096  # frame budget of one full-video step on one device
    c.data.max_buckets = 16  # buckets chosen from the split's lengths (<= this many shapes)
    c.data.bucket_lengths = ()  # explicit bucket lengths instead ((): choose them)
    c.data.num_workers = 2  # Grain worker processes decoding steps (0 = in this process)
    c.data.prefetch = 2  # steps buffered ahead

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"
    c.model.width = 64
    c.model.num_clusters = 16  # K
    c.model.sampling = "cluster"  # "cluster" (full video) | "uniform" | "dense"
    c.model.cluster_method = "cumulative"
    c.model.window = 1  # Hamming-distance window (1 = the paper's rule)
    c.model.chunk_size = 32  # frames per chunk in the two-pass model
    c.model.cluster_point = "stage1"
    c.model.temporal_shift = True
    c.model.dense_stride = 2
    c.model.dropout_rate = 0.8
    c.model.dtype = "float32"  # compute dtype ("float32" | "bfloat16"); params stay float32
    # How sampling="cluster" keeps activations for the backward pass (fva_jax/models/plans.py):
    # "auto" = per batch shape the fastest that fits model.activation_budget_mb (evaluation:
    # by forward-only estimates, nothing kept for a backward); "unchunked"
    # (all kept, memory O(T)), "keep_stem" (stem outputs kept), "recompute" (memory flat in T).
    c.model.plan = "auto"
    # Activation memory per device for plan="auto", in MiB; -1 = 0.6 of the memory the device
    # reports (GPU/TPU), or 2048 where it reports none (CPU). data.frames_per_device sets how
    # many frames a device holds per step, so together they decide which plan a bucket gets.
    c.model.activation_budget_mb = -1.0

    c.train = ml_collections.ConfigDict()
    # Global number of videos per sampled-frame step (the uniform warm-up, and every step of
    # sampling "uniform"/"dense"): K frames per video chosen on the host. Full-video steps are
    # sized by config.data.frames_per_device instead.
    c.train.batch_size = 16
    # Epochs: one pass over the training videos, in the mode of that epoch (sampled frames or
    # full videos), whose step counts differ. A fraction trains the first part of the last one.
    c.train.num_epochs = 40.0
    c.train.num_train_steps = -1  # > 0: train exactly this many steps (epochs cut or added)
    # The paper trains its first epochs with uniform sampling, then on full videos; the paper
    # does not say how many (docs/DESIGN.md §1), 0 disables. Needs model.sampling == "cluster".
    # A whole number of epochs (the mode changes at an epoch boundary).
    c.train.uniform_warmup_epochs = 0.0
    c.train.log_every_steps = 50
    # Backbone weights to start from (ImageNet): a torchvision state dict (.pth/.safetensors) or
    # what `python -m fva_jax.tools.import_weights` writes (a directory or its pretrained.npz); "" =
    # random initialisation. Applied once, before the first step; a resumed run keeps its
    # checkpoint. Needs model.backbone/width to match the weights (torchvision: width 64).
    c.train.init_from = ""

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # "sgd" (momentum, coupled weight decay as in PyTorch) | "adamw"
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4  # applied to conv/dense kernels only (TSM: no decay on BN, biases)
    c.optim.b1 = 0.9  # AdamW only
    c.optim.b2 = 0.999  # AdamW only
    c.optim.eps = 1e-8  # AdamW only
    c.optim.grad_clip_norm = 20.0  # global-norm clipping; 0 disables
    c.optim.classifier_name = "fc"  # name of the final Dense module (trunk/fc in models/resnet.py)
    c.optim.classifier_lr_mult = 5.0  # classifier kernel learning rate x5
    c.optim.classifier_bias_lr_mult = 10.0  # classifier bias learning rate x10

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # "cosine" | "step" | "constant", after a linear warm-up
    c.schedule.base_lr = 0.001
    c.schedule.warmup_epochs = 0.0
    c.schedule.step_epochs = (20.0, 30.0)  # "step" only: multiply by step_factor at these epochs
    c.schedule.step_factor = 0.1
    c.schedule.end_lr_factor = 0.0  # "cosine" only: final lr = base_lr * end_lr_factor

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000  # and always at the end of training
    c.checkpoint.keep = 3  # keep the last few checkpoints

    c.eval = ml_collections.ConfigDict()
    # Videos per step of the uniform (sampled K frames) evaluation; the full-video evaluation
    # is planned by config.data.frames_per_device like training.
    c.eval.batch_size = 16
    c.eval.every_steps = 0  # 0 = evaluate only at the end
    # With model.sampling "cluster": also evaluate the same network on K uniformly sampled
    # frames ("eval_uniform") to compare.
    c.eval.also_uniform = True
    # TensorBoard pictures of the clusters (fva_jax.training.timeline.render_timeline) of the first
    # eval videos, at every evaluation; 0 disables.
    c.eval.num_timeline_videos = 2

    c.distributed = ml_collections.ConfigDict()
    # "auto": initialise jax.distributed when the environment is multi-host (Cloud TPU pod,
    # SLURM, Open MPI) or a coordinator_address is given; "always" / "never" force it.
    c.distributed.initialize = "auto"
    c.distributed.coordinator_address = ""  # "host:port"; "" = let JAX detect it
    c.distributed.num_processes = -1  # -1 = let JAX detect it
    c.distributed.process_id = -1  # -1 = let JAX detect it
    c.distributed.cpu_collectives = "gloo"  # CPU-only multi-process runs (tests, laptops)
    # Seconds without heartbeats after which JAX's coordination service declares a process
    # lost and stops the others (jax.distributed.initialize's heartbeat_timeout_seconds; JAX's
    # default is 100). It bounds how long the other processes of a run wait for a lost one.
    c.distributed.heartbeat_timeout_s = 100
    return c


# The fields a resumed run may change, each with the reason. Every other field shapes the data
# order, the crops, the model or the optimisation: the trainer stores them in each checkpoint
# (`run_settings`) and refuses a resume that changes one (`compare_for_resume`). An allow-list,
# so that a new field is checked unless it is added here. "group.*" covers a whole group.
RESUMABLE_FIELDS = {
    "compilation_cache_dir": "where compiled programs are cached, not what they compute",
    "fast_compile": "how XLA optimises the same programs (speed; at most float rounding)",
    "data.data_dir": "the built data set may move; its records are the same",
    "data.manual_dir": "the downloaded data may move; it is only read to build the data set",
    "data.skip_corrupt": "it acts only while the data set is built; a resume reads the built set",
    "data.eval_split": "evaluation reads the weights, it changes nothing in training",
    "data.num_workers": "how many processes decode the same planned steps",
    "data.prefetch": "how many of the same steps are read ahead",
    "model.plan": "the memory plans give the same logits and gradients up to float rounding",
    "model.activation_budget_mb": "it only chooses the memory plan (model.plan)",
    "train.log_every_steps": "logging only",
    "train.init_from": "used only at the first start; a resumed run keeps its checkpoint",
    "checkpoint.*": "how often checkpoints are written and how many are kept",
    "eval.*": "evaluation reads the weights, it changes nothing in training",
    "distributed.*": "addresses and process ids change when a pod restarts",
}

# The run's length: stored and checked like the others, except that a longer run is allowed
# (with a warning: the learning-rate schedule is recomputed for the new length).
RUN_LENGTH_FIELDS = ("train.num_epochs", "train.num_train_steps")


def is_resumable(field: str) -> bool:
    """Whether `field` (dotted, without "config.") may change when a run resumes."""
    return field in RESUMABLE_FIELDS or any(
        key.endswith(".*") and field.startswith(key[:-1]) for key in RESUMABLE_FIELDS
    )


def run_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted name -> value (tuples as lists, for JSON) of every field that a resume must keep:
    all but RESUMABLE_FIELDS."""
    settings = {}

    def walk(node, prefix):
        for key in sorted(node.keys()):
            value = node[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, prefix + key + ".")
            elif not is_resumable(prefix + key):
                settings[prefix + key] = list(value) if isinstance(value, tuple) else value

    walk(config, "")
    return settings


def _comparable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _run_length(settings: dict[str, Any]) -> tuple[str, float] | None:
    """(the field that sets the run's length, its value), or None if not stored."""
    if not all(f in settings for f in RUN_LENGTH_FIELDS):
        return None
    if settings["train.num_train_steps"] > 0:
        return "train.num_train_steps", settings["train.num_train_steps"]
    return "train.num_epochs", settings["train.num_epochs"]


def compare_for_resume(
    stored: dict[str, Any], config: ml_collections.ConfigDict, *, finished: bool
) -> tuple[list[str], list[str], list[str]]:
    """(refused, longer, unchecked): what resuming a checkpoint whose `run_settings` were
    `stored` with `config` changes. refused and longer are "config.FIELD OLD -> NEW" strings:
    fields outside RESUMABLE_FIELDS that changed, and the run's length raised (allowed).
    A shorter run is refused unless the checkpoint's run had `finished` (then nothing is
    trained), as is switching between train.num_epochs and train.num_train_steps (which one
    is longer is known only from the data set). unchecked: fields the checkpoint did not
    store (written by an older fva_jax)."""
    now = run_settings(config)

    def change(field):
        return f"config.{field} {_comparable(stored[field])!r} -> {_comparable(now[field])!r}"

    changed = [
        f
        for f in sorted(now.keys() & stored.keys())
        if _comparable(stored[f]) != _comparable(now[f])
    ]
    refused = [change(f) for f in changed if f not in RUN_LENGTH_FIELDS]
    longer = []
    before, after = _run_length(stored), _run_length(now)
    if before is not None and before != after:
        if before[0] != after[0]:
            refused += [change(f) for f in changed if f in RUN_LENGTH_FIELDS]
        elif after[1] > before[1]:
            longer.append(change(after[0]))
        elif not finished:
            refused.append(change(after[0]))
    return refused, longer, sorted(f"config.{f}" for f in now.keys() - stored.keys())


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field} {message}", field=field)


def _check_fields(config, reference, prefix: str):
    """Unknown or missing field names, with a did-you-mean suggestion."""
    given, wanted = set(config.keys()), set(reference.keys())
    for key in sorted(given - wanted):
        close = difflib.get_close_matches(key, sorted(wanted), n=1)
        hint = f" (did you mean config.{prefix}{close[0]}?)" if close else ""
        raise ConfigError(
            f"config.{prefix}{key} is not a known field{hint}; "
            f"known fields of config{('.' + prefix[:-1]) if prefix else ''}: "
            f"{', '.join(sorted(wanted))}",
            field=prefix + key,
        )
    for key in sorted(wanted - given):
        raise ConfigError(
            f"config.{prefix}{key} is missing; every config must declare it "
            "(start from fva_jax.config_lib.default_config())",
            field=prefix + key,
        )
    for key in sorted(wanted):
        ref_value = reference[key]
        if isinstance(ref_value, ml_collections.ConfigDict):
            if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
                _fail(prefix + key, f"must be a group of fields, got {config[key]!r}")
            _check_fields(config[key], ref_value, prefix + key + ".")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(config, field: str, low: int):
    value = _get(config, field)
    if not _is_int(value):
        _fail(field, f"must be an integer, got {value!r}")
    if value < low:
        _fail(field, f"must be >= {low}, got {value}")


def _num_in(
    config,
    field: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
):
    value = _get(config, field)
    if not _is_num(value):
        _fail(field, f"must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        _fail(field, f"must be in {left}{low}, {high}{right}, got {value}")


def _one_of(config, field: str, choices):
    value = _get(config, field)
    if value not in choices:
        _fail(field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    device_count: int | None = None,
    process_count: int | None = None,
) -> None:
    """Checks names and values of every field; raises ConfigError naming the field.

    device_count / process_count: when given (the trainer passes jax.device_count() and
    jax.process_count()), the batch sizes must split evenly over them.
    """
    _check_fields(config, default_config(), "")
    names = allowed_names()

    if not _is_int(config.seed):
        _fail("seed", f"must be an integer, got {config.seed!r}")
    if not isinstance(config.fast_compile, bool):
        _fail("fast_compile", f"must be True or False, got {config.fast_compile!r}")
    if not isinstance(config.compilation_cache_dir, str):
        _fail(
            "compilation_cache_dir",
            "must be a directory, '' (WORKDIR/compilation_cache) or 'off', "
            f"got {config.compilation_cache_dir!r}",
        )

    # Data.
    _one_of(config, "data.name", names["data.name"])
    for field in ("data.builder_config", "data.data_dir", "data.manual_dir"):
        if not isinstance(_get(config, field), str):
            _fail(field, f"must be a string, got {_get(config, field)!r}")
    for field in ("data.train_split", "data.eval_split"):
        value = _get(config, field)
        if not isinstance(value, str) or not value:
            _fail(field, f"must be a non-empty split name, got {value!r}")
    _int_at_least(config, "data.max_frames", 0)
    _int_at_least(config, "data.frame_stride", 1)
    _int_at_least(config, "data.crop_size", 1)
    _int_at_least(config, "data.resize_short", 1)
    if config.data.resize_short < config.data.crop_size:
        _fail(
            "data.resize_short",
            f"must be >= config.data.crop_size ({config.data.crop_size}), "
            f"got {config.data.resize_short}",
        )
    scales = config.data.crop_scales
    if (
        not isinstance(scales, (tuple, list))
        or not scales
        or not all(_is_num(s) and 0 < s <= 1 for s in scales)
    ):
        _fail("data.crop_scales", f"must be a non-empty tuple of numbers in (0, 1], got {scales!r}")
    for field in ("data.hflip", "data.skip_corrupt"):
        if not isinstance(_get(config, field), bool):
            _fail(field, f"must be True or False, got {_get(config, field)!r}")
    _int_at_least(config, "data.frames_per_device", 1)
    _int_at_least(config, "data.max_buckets", 1)
    _int_at_least(config, "data.num_workers", 0)
    _int_at_least(config, "data.prefetch", 0)

    # Model.
    _one_of(config, "model.backbone", names["model.backbone"])
    _int_at_least(config, "model.width", 1)
    _int_at_least(config, "model.num_clusters", 1)
    if 0 < config.data.max_frames < config.model.num_clusters:
        _fail(
            "model.num_clusters",
            f"must be <= config.data.max_frames "
            f"({config.data.max_frames}), got {config.model.num_clusters}",
        )
    _one_of(config, "model.sampling", names["model.sampling"])
    _one_of(config, "model.cluster_method", names["model.cluster_method"])
    _int_at_least(config, "model.window", 1)
    _int_at_least(config, "model.chunk_size", 1)
    _one_of(config, "model.cluster_point", names["model.cluster_point"])
    if not isinstance(config.model.temporal_shift, bool):
        _fail("model.temporal_shift", f"must be True or False, got {config.model.temporal_shift!r}")
    _int_at_least(config, "model.dense_stride", 1)
    _num_in(config, "model.dropout_rate", 0.0, 1.0, high_open=True)
    _one_of(config, "model.dtype", names["model.dtype"])
    _one_of(config, "model.plan", names["model.plan"])
    budget = config.model.activation_budget_mb
    if not _is_num(budget) or not (budget == -1 or budget > 0):
        _fail(
            "model.activation_budget_mb",
            f"must be a number of MiB > 0, or -1 for the device's memory; got {budget!r}",
        )
    # Data fields that depend on the model's chunk size.
    chunk = config.model.chunk_size
    if config.data.frames_per_device < chunk:
        _fail(
            "data.frames_per_device",
            f"must hold at least one chunk (config.model.chunk_size = {chunk}), "
            f"got {config.data.frames_per_device}",
        )
    buckets = config.data.bucket_lengths
    if not isinstance(buckets, (tuple, list)) or not all(
        _is_int(b) and b > 0 and b % chunk == 0 for b in buckets
    ):
        _fail(
            "data.bucket_lengths",
            f"must be a tuple of positive multiples of config.model.chunk_size ({chunk}), "
            f"or () to choose buckets from the lengths, got {buckets!r}",
        )
    if list(buckets) != sorted(set(buckets)):
        _fail("data.bucket_lengths", f"must be strictly increasing, got {tuple(buckets)}")

    # Training length and batch.
    _int_at_least(config, "train.batch_size", 1)
    _int_at_least(config, "train.num_train_steps", -1)
    if config.train.num_train_steps == 0:
        _fail("train.num_train_steps", "must be > 0, or -1 to train for config.train.num_epochs")
    if config.train.num_train_steps < 0:
        _num_in(config, "train.num_epochs", 0.0, low_open=True)
    _num_in(config, "train.uniform_warmup_epochs", 0.0)
    if not float(config.train.uniform_warmup_epochs).is_integer():
        _fail(
            "train.uniform_warmup_epochs",
            "must be a whole number of epochs (training switches from sampled frames to full "
            f"videos at an epoch boundary), got {config.train.uniform_warmup_epochs}",
        )
    if config.train.uniform_warmup_epochs > 0 and config.model.sampling != "cluster":
        _fail(
            "train.uniform_warmup_epochs",
            "> 0 needs config.model.sampling == 'cluster' (it "
            f"switches from uniform to cluster sampling), got sampling "
            f"{config.model.sampling!r}",
        )
    _int_at_least(config, "train.log_every_steps", 1)
    if not isinstance(config.train.init_from, str):
        _fail(
            "train.init_from",
            f"must be a path string ('' = random init), got {config.train.init_from!r}",
        )

    # Optimizer.
    _one_of(config, "optim.name", OPTIMIZERS)
    _num_in(config, "optim.momentum", 0.0, 1.0, high_open=True)
    if not isinstance(config.optim.nesterov, bool):
        _fail("optim.nesterov", f"must be True or False, got {config.optim.nesterov!r}")
    _num_in(config, "optim.weight_decay", 0.0)
    _num_in(config, "optim.b1", 0.0, 1.0, high_open=True)
    _num_in(config, "optim.b2", 0.0, 1.0, high_open=True)
    _num_in(config, "optim.eps", 0.0, low_open=True)
    _num_in(config, "optim.grad_clip_norm", 0.0)
    if not isinstance(config.optim.classifier_name, str) or not config.optim.classifier_name:
        _fail(
            "optim.classifier_name",
            f"must be a non-empty module name, got {config.optim.classifier_name!r}",
        )
    _num_in(config, "optim.classifier_lr_mult", 0.0, low_open=True)
    _num_in(config, "optim.classifier_bias_lr_mult", 0.0, low_open=True)

    # Schedule.
    _one_of(config, "schedule.name", SCHEDULES)
    _num_in(config, "schedule.base_lr", 0.0, low_open=True)
    _num_in(config, "schedule.warmup_epochs", 0.0)
    steps = config.schedule.step_epochs
    if (
        not isinstance(steps, (tuple, list))
        or not all(_is_num(s) and s > 0 for s in steps)
        or list(steps) != sorted(steps)
    ):
        _fail(
            "schedule.step_epochs", f"must be an increasing tuple of positive epochs, got {steps!r}"
        )
    _num_in(config, "schedule.step_factor", 0.0, 1.0, low_open=True)
    _num_in(config, "schedule.end_lr_factor", 0.0, 1.0)

    # Checkpoints, evaluation, distributed.
    _int_at_least(config, "checkpoint.every_steps", 1)
    _int_at_least(config, "checkpoint.keep", 1)
    _int_at_least(config, "eval.batch_size", 1)
    _int_at_least(config, "eval.every_steps", 0)
    if not isinstance(config.eval.also_uniform, bool):
        _fail("eval.also_uniform", f"must be True or False, got {config.eval.also_uniform!r}")
    _int_at_least(config, "eval.num_timeline_videos", 0)
    _one_of(config, "distributed.initialize", DISTRIBUTED_MODES)
    if not isinstance(config.distributed.coordinator_address, str):
        _fail(
            "distributed.coordinator_address",
            f"must be a 'host:port' string or '', got {config.distributed.coordinator_address!r}",
        )
    _int_at_least(config, "distributed.num_processes", -1)
    _int_at_least(config, "distributed.process_id", -1)
    _one_of(config, "distributed.cpu_collectives", ("gloo", "mpi", "none"))
    _int_at_least(config, "distributed.heartbeat_timeout_s", 1)

    # Batches must split evenly: each host feeds batch/process_count examples, each device
    # batch/device_count.
    for field in ("train.batch_size", "eval.batch_size"):
        value = _get(config, field)
        if device_count is not None and value % device_count:
            _fail(
                field,
                f"must be divisible by the number of devices ({device_count}), got {value}; "
                f"use a multiple of {device_count}",
            )
        if process_count is not None and value % process_count:
            _fail(
                field,
                f"must be divisible by the number of processes ({process_count}), got {value}",
            )


def check_overrides(argv, flag: str = "config") -> None:
    """Checks the field names of command-line overrides (`--config.<group>.<field>=VALUE`, or
    `--config.<group>.<field> VALUE`) in argv against default_config(); raises ConfigError
    naming the flag, its value and the closest known field. ml_collections would otherwise
    fail inside flag parsing with a long traceback."""
    reference = default_config()
    prefix = f"--{flag}."
    for i, arg in enumerate(argv):
        if not arg.startswith(prefix):
            continue
        name, has_value, value = arg[len(prefix) :].partition("=")
        if not has_value:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        node, path, parts = reference, [], name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                group = "config" + "".join("." + p for p in path)
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, known, n=1)
                fix = (
                    f"did you mean --{flag}.{'.'.join(path + close + parts[depth + 1 :])}={value}?"
                    if close
                    else f"known fields of {group}: {', '.join(known)}"
                )
                raise ConfigError(
                    f"--{flag}.{name}={value}: config.{name} is not a known field; {fix}",
                    field=name,
                )
            node = node[part]
            path.append(part)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain-Python view of a config, e.g. for logging or JSON."""
    return config.to_dict()


def from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `to_dict` (e.g. of a run's saved config.json): default_config() updated with
    `d`, lists turned back into tuples where the default is a tuple; checked with
    validate_config. Raises ConfigError naming an unknown field."""
    config = default_config()

    def update(node, values, prefix):
        for key, value in values.items():
            if key not in node:
                raise ConfigError(
                    f"config.{prefix}{key} is not a known field (saved by another "
                    "version of fva_jax?)"
                )
            if isinstance(node[key], ml_collections.ConfigDict):
                if not isinstance(value, dict):
                    _fail(prefix + key, f"must be a group of fields, got {value!r}")
                update(node[key], value, prefix + key + ".")
            else:
                node[key] = tuple(value) if isinstance(node[key], tuple) else value

    update(config, d, "")
    validate_config(config)
    return config


def load_config_file(path) -> ml_collections.ConfigDict:
    """get_config() of a config file (e.g. "configs/demo.py"), loaded by path the way
    `--config=<path>` does; for notebooks and tests."""
    import importlib.util  # pylint: disable=g-import-not-at-top
    import pathlib  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"fva_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
