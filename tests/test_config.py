"""Configs: every configs/*.py loads and validates, holds the paper's settings, and bad
field names or values fail with a message naming the field."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from fva_jax import config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
DATASET_CONFIGS = {
    "breakfast": ("breakfast", 16, True, "s1", "test"),
    "ucf101": ("ucf101", 8, True, "split1", "test"),
    "hmdb51": ("hmdb51", 8, True, "split1", "test"),
    "something_v1": ("something_something_v1", 16, False, "", "validation"),
    "something_v2": ("something_something_v2", 16, False, "", "validation"),
}


def test_every_config_file_is_covered():
    names = {p.stem for p in CONFIG_FILES}
    assert set(DATASET_CONFIGS) | {"demo"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_file_loads_and_validates(path):
    config = config_lib.load_config_file(path)
    config_lib.validate_config(config, device_count=1, process_count=1)
    # Exactly the fields of the default config: nothing undeclared, nothing missing.
    assert set(config_lib.default_config().to_dict()) == set(config.to_dict())


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_dataset_configs_hold_the_paper_recipe(name):
    dataset, k, hflip, builder_config, eval_split = DATASET_CONFIGS[name]
    c = config_lib.load_config_file(REPO / "configs" / f"{name}.py")
    assert (c.data.name, c.data.builder_config, c.data.eval_split) == (
        dataset,
        builder_config,
        eval_split,
    )
    assert c.model.num_clusters == k and c.data.hflip is hflip
    assert (c.model.backbone, c.model.sampling, c.model.cluster_method) == (
        "resnet50",
        "cluster",
        "cumulative",
    )
    assert c.data.crop_size == 224 and tuple(c.data.crop_scales) == (1.0, 0.875, 0.75, 0.66)
    assert (c.optim.name, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.9, 5e-4)
    assert (c.schedule.base_lr, c.train.batch_size, c.train.num_epochs) == (0.001, 16, 40)
    assert (c.model.dropout_rate, c.optim.grad_clip_norm) == (0.8, 20)
    assert (c.optim.classifier_lr_mult, c.optim.classifier_bias_lr_mult) == (5, 10)
    assert c.train.uniform_warmup_epochs > 0
    # "No frame left behind": every frame of every video, no stride, no cap.
    assert (c.data.frame_stride, c.data.max_frames) == (1, 0)


def _with(field: str, value):
    config = config_lib.default_config()
    *groups, name = field.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[name] = value
    return config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.num_clusters", 0, "config.model.num_clusters must be >= 1, got 0"),
        (
            "data.frames_per_device",
            16,
            "config.data.frames_per_device must hold at least one chunk "
            "(config.model.chunk_size = 32), got 16",
        ),
        (
            "data.bucket_lengths",
            (64, 100),
            "config.data.bucket_lengths must be a tuple of positive multiples of "
            "config.model.chunk_size (32)",
        ),
        ("data.bucket_lengths", (96, 64), "config.data.bucket_lengths must be strictly increasing"),
        ("data.max_buckets", 0, "config.data.max_buckets must be >= 1, got 0"),
        ("data.num_workers", -1, "config.data.num_workers must be >= 0, got -1"),
        ("data.prefetch", -1, "config.data.prefetch must be >= 0, got -1"),
        (
            "data.name",
            "kinetics",
            "config.data.name must be one of 'sparse_events', 'breakfast', "
            "'ucf101', 'hmdb51', 'something_something_v1', 'something_something_v2', "
            "got 'kinetics'",
        ),
        (
            "model.sampling",
            "random",
            "config.model.sampling must be one of 'cluster', 'uniform', 'dense', got 'random'",
        ),
        (
            "model.cluster_method",
            "kmeans",
            "config.model.cluster_method must be one of 'cumulative', 'slope', got 'kmeans'",
        ),
        (
            "model.backbone",
            "resnet101",
            "config.model.backbone must be one of 'resnet18', 'resnet50', got 'resnet101'",
        ),
        (
            "model.dtype",
            "float16",
            "config.model.dtype must be one of 'float32', 'bfloat16', got 'float16'",
        ),
        ("model.dropout_rate", 1.0, "config.model.dropout_rate must be in [0.0, 1.0), got 1.0"),
        ("model.window", 0, "config.model.window must be >= 1, got 0"),
        (
            "model.plan",
            "fast",
            "config.model.plan must be one of 'auto', 'unchunked', 'keep_stem', 'recompute', "
            "got 'fast'",
        ),
        (
            "model.activation_budget_mb",
            0,
            "config.model.activation_budget_mb must be a number of MiB > 0, or -1 for the "
            "device's memory; got 0",
        ),
        (
            "data.crop_size",
            300,
            "config.data.resize_short must be >= config.data.crop_size (300), got 256",
        ),
        (
            "data.crop_scales",
            (1.0, 1.5),
            "config.data.crop_scales must be a non-empty tuple of "
            "numbers in (0, 1], got (1.0, 1.5)",
        ),
        ("data.max_frames", -1, "config.data.max_frames must be >= 0, got -1"),
        ("train.batch_size", 0, "config.train.batch_size must be >= 1, got 0"),
        ("train.num_train_steps", 0, "config.train.num_train_steps must be > 0, or -1"),
        ("train.num_epochs", -1.0, "config.train.num_epochs must be in (0.0, inf], got -1.0"),
        ("optim.name", "lamb", "config.optim.name must be one of 'sgd', 'adamw', got 'lamb'"),
        ("optim.momentum", 1.0, "config.optim.momentum must be in [0.0, 1.0), got 1.0"),
        (
            "schedule.name",
            "linear",
            "config.schedule.name must be one of 'cosine', 'step', 'constant', got 'linear'",
        ),
        ("schedule.base_lr", 0.0, "config.schedule.base_lr must be in (0.0, inf], got 0.0"),
        (
            "schedule.step_epochs",
            (30.0, 20.0),
            "config.schedule.step_epochs must be an increasing "
            "tuple of positive epochs, got (30.0, 20.0)",
        ),
        ("checkpoint.every_steps", 0, "config.checkpoint.every_steps must be >= 1, got 0"),
        (
            "distributed.initialize",
            "maybe",
            "config.distributed.initialize must be one of 'auto', 'always', 'never', got 'maybe'",
        ),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate_config(_with(field, value))
    assert message in str(e.value)


def test_uniform_warmup_needs_cluster_sampling():
    config = _with("train.uniform_warmup_epochs", 2.0)
    config.model.sampling = "uniform"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.train.uniform_warmup_epochs > 0 "
        r"needs config.model.sampling == 'cluster'",
    ):
        config_lib.validate_config(config)


def test_batch_must_split_over_devices_and_processes():
    config = _with("train.batch_size", 6)
    config_lib.validate_config(config, device_count=2, process_count=2)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.train.batch_size must be divisible "
        r"by the number of devices \(4\), got 6; use a multiple of 4",
    ):
        config_lib.validate_config(config, device_count=4)
    config = _with("eval.batch_size", 3)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.eval.batch_size must be divisible "
        r"by the number of processes \(2\), got 3",
    ):
        config_lib.validate_config(config, process_count=2)


def test_unknown_and_missing_fields():
    config = config_lib.default_config()
    config.model.num_cluster = 8  # a typo the ConfigDict accepts by itself
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.model.num_cluster is not a known "
        r"field \(did you mean config.model.num_clusters\?\)",
    ):
        config_lib.validate_config(config)
    config = config_lib.default_config()
    del config.eval["also_uniform"]
    with pytest.raises(config_lib.ConfigError, match=r"config.eval.also_uniform is missing"):
        config_lib.validate_config(config)


def _parse_flags(argv):
    """argv parsed the way fva_jax.main parses its --config flag."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def test_command_line_override_of_unknown_field_is_rejected():
    demo = f"--config={REPO / 'configs' / 'demo.py'}"
    assert _parse_flags(["prog", demo, "--config.model.num_clusters=4"]).model.num_clusters == 4
    # ml_collections refuses fields the config does not declare, with a suggestion.
    with pytest.raises((flags.Error, AttributeError), match='Did you mean "num_clusters"'):
        _parse_flags(["prog", demo, "--config.model.num_cluster=4"])


def test_main_rejects_bad_value_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fva_jax.main",
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            "--config.model.num_clusters=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0
    assert "config.model.num_clusters must be >= 1, got 0" in proc.stderr
    assert not workdir.exists()  # failed before creating anything


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--config.model.num_clusters=0",
            "fva_jax.main: config error: config.model.num_clusters must be >= 1, got 0 "
            "(given as --config.model.num_clusters=0)",
        ),
        (
            "--config.model.num_cluster=8",
            "fva_jax.main: config error: --config.model.num_cluster=8: config.model.num_cluster "
            "is not a known field; did you mean --config.model.num_clusters=8?",
        ),
    ],
)
def test_main_config_errors_are_one_line(tmp_path, override, expected):
    """A user's config mistake ends in one line naming the field, the value and the fix, and a
    non-zero exit status; no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fva_jax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'run'}",
            override,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [expected]
    assert not (tmp_path / "run").exists()


def test_check_overrides_accepts_known_fields_and_names_unknown_ones():
    config_lib.check_overrides(["--config.model.num_clusters=4", "--config.train.batch_size", "8"])
    config_lib.check_overrides(["--workdir=/x", "--config=configs/demo.py"])
    with pytest.raises(
        config_lib.ConfigError,
        match=r"--config.trian.batch_size=8: .*did you mean --config.train.batch_size=8\?",
    ):
        config_lib.check_overrides(["--config.trian.batch_size", "8"])
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.model.zzz is not a known field; known fields of config.model: "
        r"activation_budget_mb, backbone",
    ):
        config_lib.check_overrides(["--config.model.zzz=1"])


def test_name_lists_have_one_source():
    """Each field's names come from the module that implements them (the same object), and the
    data set names equal the registered builders."""
    from fva_jax import clustering
    from fva_jax.data import builders
    from fva_jax.models import full_video, resnet

    names = config_lib.allowed_names()
    assert names["model.backbone"] is resnet.BACKBONES
    assert names["model.cluster_point"] is resnet.CLUSTER_POINTS
    assert names["model.sampling"] is full_video.SAMPLINGS
    assert names["model.cluster_method"] is clustering.METHODS
    assert names["model.plan"] is full_video.PLANS
    assert set(names["data.name"]) == set(builders.BUILDERS)
    for backbone in resnet.BACKBONES:  # every listed backbone is one the model builds
        assert f"resnet{resnet.depth_of(backbone)}" == backbone


@pytest.mark.parametrize("field", sorted(config_lib.allowed_names()))
def test_validation_accepts_exactly_the_listed_names(field):
    """Every listed name validates; anything else is rejected with the list in the message."""
    choices = config_lib.allowed_names()[field]
    for value in choices:
        config_lib.validate_config(_with(field, value))
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate_config(_with(field, "no_such_name"))
    listed = ", ".join(map(repr, choices))
    assert f"config.{field} must be one of {listed}, got 'no_such_name'" in str(e.value)


def test_model_fields_are_the_model_constructor_arguments():
    """config.model holds exactly FullVideoModel's fields but num_classes (the trainer passes
    it as keyword arguments), with the model's own defaults where the recipe keeps them."""
    import dataclasses

    from fva_jax.models.full_video import FullVideoModel

    fields = {f.name for f in dataclasses.fields(FullVideoModel)} - {"parent", "name"}
    config = config_lib.default_config()
    assert set(config.model) == fields - {"num_classes"}
    defaults = {f.name: f.default for f in dataclasses.fields(FullVideoModel)}
    assert config.model.plan == defaults["plan"] == "auto"
    assert config.model.activation_budget_mb == defaults["activation_budget_mb"] == -1


def test_resumable_fields_name_existing_fields_each_with_a_reason():
    """config_lib.RESUMABLE_FIELDS names fields (or "group.*" groups) that exist, each with a
    reason; everything else, a new field included, is in run_settings (checked on resume)."""
    config = config_lib.default_config()
    for name, reason in config_lib.RESUMABLE_FIELDS.items():
        node = config
        for part in name.removesuffix(".*").split("."):
            assert part in node, name
            node = node[part]
        assert isinstance(node, type(config)) == name.endswith(".*"), name
        assert isinstance(reason, str) and reason, name
    config.model.new_field = 1  # a field added later is checked unless listed
    settings = config_lib.run_settings(config)
    assert settings["seed"] == 0 and settings["model.new_field"] == 1
    assert settings["data.crop_scales"] == [1.0, 0.875, 0.75, 0.66]  # as JSON stores it
    assert set(config_lib.RUN_LENGTH_FIELDS) <= set(settings)
    for resumable in ("data.num_workers", "model.plan", "train.init_from", "eval.batch_size"):
        assert resumable not in settings
    assert not any(k.split(".")[0] in ("checkpoint", "eval", "distributed") for k in settings)
