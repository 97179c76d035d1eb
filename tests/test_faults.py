"""Faults (fva_jax.training.faults): SIGTERM (preemption), a full disk, a lost process, a corrupt
latest checkpoint.

The real data pipeline on the generated sparse_events "tiny" set (12 train / 6 test videos
of 12-24 frames, two length buckets) and a ResNet-18 of width 4 at 16 px: one sampled-frame
epoch (3 steps), then one full-video epoch (6 steps), a checkpoint every 3 steps. A
persistent compilation cache shared by the module and its subprocesses keeps the repeated
runs cheap. A resume must end with exactly the final metrics of the uninterrupted run.
"""

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fva_jax import config_lib
from fva_jax import main as fva_main
from fva_jax.data import builders, pipeline
from fva_jax.data import sparse_events as se
from fva_jax.training import checkpoints, experiment, faults, train

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 9  # 3 sampled + 6 full-video

# Overrides of configs/demo.py (data.data_dir is added by `config_for` / `flags_for`).
TINY = {
    "fast_compile": True,
    "data.builder_config": "tiny",
    "data.resize_short": 16,
    "data.crop_size": 16,
    "data.frames_per_device": 48,
    "data.max_buckets": 2,
    "data.num_workers": 0,
    "data.prefetch": 1,
    "model.width": 4,
    "model.num_clusters": 4,
    "model.chunk_size": 8,
    "train.batch_size": 4,
    "train.num_epochs": 2.0,
    "train.uniform_warmup_epochs": 1,
    "train.log_every_steps": 1,
    "schedule.warmup_epochs": 0.0,
    "checkpoint.every_steps": 3,
    "eval.batch_size": 4,
    "eval.also_uniform": False,
    "eval.num_timeline_videos": 0,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    builders.prepare(builders.get_builder("sparse_events", "tiny", str(d)))
    return d


def config_for(data_dir, **extra):
    config = config_lib.load_config_file(REPO / "configs" / "demo.py")
    for field, value in {**TINY, "data.data_dir": str(data_dir), **extra}.items():
        *groups, name = field.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


def flags_for(data_dir, **extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": data_dir, **extra}.items()]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module (and its subprocesses)."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = (
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in names}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(data_dir, compile_cache, tmp_path_factory):
    """An uninterrupted run: (config, workdir, final metrics)."""
    del compile_cache
    workdir = tmp_path_factory.mktemp("reference")
    config = config_for(data_dir)
    final = train.train_and_evaluate(config, str(workdir))
    assert final["step"] == TOTAL_STEPS
    return config, workdir, final


def checkpoint_steps(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def saved_data_state(workdir, step: int) -> dict:
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "metadata"
    return json.loads(path.read_text())["data_state"]


def copy_of(workdir, to) -> pathlib.Path:
    """A finished run's workdir, less its final_metrics.json."""
    shutil.copytree(workdir, to, dirs_exist_ok=True)
    (to / "final_metrics.json").unlink()
    return to


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_in_a_step_checkpoints_that_step_and_the_restart_is_exact(
    reference, tmp_path, monkeypatch
):
    """SIGTERM while the first full-video step compiles: that step finishes, is checkpointed
    with its data state, the run raises Preempted (no final_metrics.json), the handler is
    restored; running again ends with the uninterrupted run's metrics."""
    config, _, expected = reference
    original = experiment.jitted_train_steps

    def sigterm_in_the_first_full_step(run):
        jitted = original(run)

        def full(state, batch):
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
            return jitted["full"](state, batch)  # compiles the first full-video shape

        return {**jitted, "full": full}

    sent = []
    monkeypatch.setattr(experiment, "jitted_train_steps", sigterm_in_the_first_full_step)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(faults.Preempted) as stop:
        train.train_and_evaluate(config, str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is handler
    assert stop.value.checkpoint_step == 4
    assert f"stopped by SIGTERM at step 4 of {TOTAL_STEPS}" in str(stop.value)
    assert checkpoint_steps(tmp_path) == [3, 4]
    assert saved_data_state(tmp_path, 4) == {"epoch": 1, "step": 1}
    assert not (tmp_path / "final_metrics.json").exists()

    monkeypatch.undo()
    assert train.train_and_evaluate(config, str(tmp_path)) == expected
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == expected


def test_sigterm_during_the_data_set_build_leaves_nothing_half_written(tmp_path, monkeypatch):
    """SIGTERM while TFDS writes the data set (video 3 of the first split): the run stops at
    at once; no run directory and nothing of the data set, not even an unfinished
    directory, remain; the next build is complete."""
    data_dir = tmp_path / "tfds"
    original, made = se.make_video, []

    def sigterm_while_generating(*args):
        made.append(1)
        if len(made) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(se, "make_video", sigterm_while_generating)
    with pytest.raises(faults.Preempted, match="during the set-up"):
        train.train_and_evaluate(config_for(data_dir), str(tmp_path / "run"))
    assert len(made) == 3
    assert not (tmp_path / "run").exists()
    written = [str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()]
    assert written == ["sparse_events/.config/metadata.json"]  # TFDS's, written whole first
    monkeypatch.undo()
    assert pipeline.dataset_info(config_for(data_dir).data)["num_examples"] == {
        "train": 12,
        "test": 6,
    }


def test_sigterm_during_the_final_evaluation(reference, tmp_path, monkeypatch):
    """The evaluation stops at once, no final_metrics.json (not even part of one); running
    again evaluates the last checkpoint and writes the same metrics."""
    config, workdir, expected = reference
    workdir = copy_of(workdir, tmp_path)
    original = train.evaluate_state

    def sigterm_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_state", sigterm_while_evaluating)
    with pytest.raises(faults.Preempted, match="during the final evaluation") as stop:
        train.train_and_evaluate(config, str(workdir))
    assert f"checkpoint step {TOTAL_STEPS} is complete" in str(stop.value)
    assert [p.name for p in workdir.iterdir() if "final_metrics" in p.name] == []
    monkeypatch.undo()
    assert train.train_and_evaluate(config, str(workdir)) == expected


def _main_command(workdir, data_dir, **extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fva_jax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        *flags_for(data_dir, **extra),
    ]


def _env(compile_cache) -> dict:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": compile_cache,
    }


class _Output:
    """A subprocess's output lines, read by a thread, waited on by content."""

    def __init__(self, proc):
        self.lines, self._proc = [], proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            assert self._proc.poll() is None, "".join(self.lines[-40:])
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n" + "".join(self.lines[-40:])
            time.sleep(0.1)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def _live_processes_in_group(pgid: int) -> list[str]:
    """'pid state command' of the processes of group `pgid` that are not zombies (Linux)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        command = text[text.index("(") + 1 : text.rindex(")")]
        state, _ppid, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            found.append(f"{stat.parent.name} {state} {command}")
    return found


def test_sigterm_to_the_process_group_with_a_data_worker(
    reference, data_dir, compile_cache, tmp_path
):
    """The repeatable check of the README through fva_jax.main, with one Grain worker
    process: SIGTERM to the whole process group (as a scheduler sends it) after step 4, the
    first full-video step. Exit status 75 with one line on stderr, a checkpoint of the step
    reached, the worker neither died first nor outlived the trainer; the same command
    again ends with the uninterrupted run's final_metrics.json (trained without workers)."""
    _, _, expected = reference
    command = _main_command(
        tmp_path, data_dir, **{"data.num_workers": 1, "checkpoint.every_steps": 100000}
    )
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(compile_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = _Output(proc)
        output.wait_for(rf"step 4/{TOTAL_STEPS}", timeout=240)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=120)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = output.text()
    assert status == faults.EXIT_PREEMPTED, log[-4000:]
    steps = checkpoint_steps(tmp_path)
    assert len(steps) == 1 and 4 <= steps[0] <= TOTAL_STEPS, steps
    stopped = re.findall(r"fva_jax.main: stopped by SIGTERM (at step \d+|during the final)", log)
    # (Step 9 and its final evaluation may have come before the signal.)
    assert stopped in ([f"at step {steps[0]}"], ["during the final"]), log[-3000:]
    if stopped != ["during the final"]:  # the training stream's worker ran since step 3
        assert "Worker process was terminated" not in log and "reading data failed" not in log
    assert took < 60, took
    deadline = time.monotonic() + 20
    while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_processes_in_group(proc.pid) == []

    again = subprocess.run(
        command, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"Resumed from checkpoint step {steps[0]}" in again.stderr
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == expected


def test_exit_statuses(capsys):
    def raising(error):
        def work():
            raise error

        return work

    cases = [
        (faults.Preempted("stopped by SIGTERM at step 4 of 9", 4), 75),
        (
            faults.CheckpointWriteError(
                "cannot write checkpoint step 6 to /w/checkpoints: ENOSPC",
                errno_=errno.ENOSPC,
                directory="/w/checkpoints",
                latest_step=3,
            ),
            74,
        ),
        (config_lib.ConfigError("config.seed must be an integer", field="seed"), 2),
        (
            faults.NonFiniteError(
                "training stopped at step 4: the gradient norm is nan (the last good "
                "checkpoint is step 2 in /w/checkpoints; nothing of step 4 was saved). Try ...",
                step=4,
                latest_step=2,
            ),
            65,
        ),
    ]
    for error, status in cases:
        with pytest.raises(SystemExit) as exit_:
            fva_main.run_with_exit_statuses(raising(error))
        assert exit_.value.code == status
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(error) in lines[0]


_SYNC_POINT = """
import os, signal, sys, time
import jax
from fva_jax.training import faults

service = sys.argv[2] == "on"
jax.config.update("jax_enable_preemption_service", service)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=1, process_id=0)
with faults.StopNotice() as notice:
    assert notice.multi_process
    print("BEFORE", [notice.reached(step) for step in range(3)], flush=True)
    if service:
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler starts the sync protocol
    for step in range(3, 300 if service else 10):
        if notice.reached(step):
            print("REACHED", step, flush=True)
            break
        time.sleep(0.02)
    else:
        print("NEVER REACHED", flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("service", ["on", "off"])
def test_the_preemption_sync_point_with_and_without_jax_service(service, tmp_path):
    """One process of jax.distributed: with JAX's preemption service, SIGTERM makes
    `reached(step)` true at a later step; without it (jax_enable_preemption_service=False,
    where JAX's sync-point function raises RuntimeError) `reached` is false at every step."""
    script = tmp_path / "sync_point.py"
    script.write_text(_SYNC_POINT)
    out = subprocess.run(
        [sys.executable, str(script), str(_free_port()), service],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "BEFORE [False, False, False]" in out.stdout, log[-3000:]
    if service == "on":
        assert re.search(r"^REACHED \d+$", out.stdout, re.M), log[-3000:]
    else:
        assert "NEVER REACHED" in out.stdout, log[-3000:]
        assert "preemption service is off" in log


def test_no_private_jax_api_in_the_package():
    """fva_jax uses JAX's public API only (jax._src changes without notice between releases)."""
    import ast

    private = []
    for path in (REPO / "fva_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            private += [f"{path.relative_to(REPO)}: {n}" for n in names if "._src" in n]
    assert not private, private


def test_a_run_with_two_workers_ends_without_leaked_shared_memory(data_dir, compile_cache):
    """Two Grain workers, training and both evaluations with timeline pictures: the run ends
    without multiprocessing's resource_tracker warning of leaked shared memory (steps that
    the trainer still held at exit, or that Grain unlinked in a thread that exit stopped)
    and without any traceback."""
    out = subprocess.run(
        [
            sys.executable,
            "tests/run_main.py",
            "--config=configs/demo.py",
            f"--workdir={data_dir.parent / 'two_workers'}",
            *flags_for(data_dir, **{"data.num_workers": 2, "eval.num_timeline_videos": 2}),
        ],
        cwd=REPO,
        env=_env(compile_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    final = json.loads(re.findall(r"FINAL_METRICS (\{.*\})", log)[-1])
    assert final["step"] == TOTAL_STEPS
    assert "resource_tracker" not in log and "leaked shared_memory" not in log, log[-2000:]
    assert "Traceback" not in log and "Exception ignored" not in log, log[-4000:]


# ----------------------------------------------------------------------------- full disk


@pytest.mark.parametrize(
    "error, code",
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (PermissionError(errno.EACCES, "Permission denied", "/ckpt/6"), errno.EACCES),
        (
            # What TensorStore raises (measured on a full tmpfs).
            ValueError(
                'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/3.orbax-checkpoint'
                '-tmp/state.orbax-checkpoint-tmp/_sharding": Failed to write 23055 bytes to '
                "file 13: No space left on device [os_error_code='28']"
            ),
            errno.ENOSPC,
        ),
        (ValueError("Requested shape (3,) does not match the saved (4,)"), None),
    ],
)
def test_storage_errors_are_recognised(error, code):
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = error
    for e in (error, wrapped):
        found = faults.storage_error(e)
        assert (found[0] if found else None) == code


def test_full_disk_stops_with_one_message_and_the_restart_is_exact(
    reference, tmp_path, monkeypatch
):
    """No space for checkpoint 6 (raised where our code hands it to Orbax): one error naming
    the directory and the reason, what Orbax left of step 6 removed, checkpoint 3 intact;
    with space again, the same call resumes from 3 and ends with the uninterrupted metrics."""
    config, _, expected = reference
    original = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 6:
            (pathlib.Path(self.directory) / "6.orbax-checkpoint-tmp-1").mkdir()  # a partial save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(faults.CheckpointWriteError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert f"cannot write checkpoint step 6 to {tmp_path / 'checkpoints'}: ENOSPC" in message
    assert "No space left on device" in message and "step 3, is intact" in message
    assert (error.value.errno, error.value.latest_step) == (errno.ENOSPC, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    assert checkpoints.unreadable_reason(tmp_path / "checkpoints", 3) is None

    monkeypatch.undo()
    assert train.train_and_evaluate(config, str(tmp_path)) == expected


# ----------------------------------------------------------------------------- corrupt checkpoints


def test_corrupt_latest_checkpoints_are_moved_aside_and_training_resumes(
    reference, tmp_path, caplog
):
    """Checkpoint 9 with its largest array file cut in half, checkpoint 6 without the
    metadata of its data state: both are named in warnings and moved to
    checkpoints/corrupt-<step>-<time>; training resumes from 3 and ends with the
    uninterrupted metrics."""
    config, workdir, expected = reference
    workdir = copy_of(workdir, tmp_path)
    ckpt = workdir / "checkpoints"
    largest = max(
        (p for p in (ckpt / "9" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    (ckpt / "6" / "data" / "metadata").unlink()
    assert checkpoints.unreadable_reason(ckpt, 9) and checkpoints.unreadable_reason(ckpt, 6)

    with caplog.at_level("WARNING"):
        assert train.train_and_evaluate(config, str(workdir)) == expected
    for step in (9, 6):
        named = rf"checkpoint step {step} in {ckpt} cannot be read \(.+\); moved it to "
        assert re.search(named + rf"{ckpt}/corrupt-{step}-", caplog.text)
    assert "Resuming from the previous complete checkpoint, step 3" in caplog.text
    assert checkpoint_steps(workdir) == [3, 6, 9]
    assert sorted(re.sub(r"-\d{8}T\d{6}Z$", "", p.name) for p in ckpt.glob("corrupt-*")) == [
        "corrupt-6",
        "corrupt-9",
    ]


def test_a_checkpoint_of_another_model_is_an_error_not_corruption(reference, tmp_path):
    """A readable checkpoint that does not fit the config (another width) stops the run;
    nothing is moved aside. (The checkpoints here do not store the run's settings, as those
    of an older fva_jax: checkpoints.check_resume would refuse the width before restoring.)"""
    config, workdir, _ = reference
    workdir = copy_of(workdir, tmp_path)
    for step in checkpoint_steps(workdir):
        path = workdir / "checkpoints" / str(step) / "data" / "metadata"
        data = json.loads(path.read_text())
        del data["config"], data["total_steps"]
        path.write_text(json.dumps(data))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(Exception) as error:  # noqa: B017  (orbax's shape error)
        train.train_and_evaluate(
            config_for(config.data.data_dir, **{"model.width": 8}), str(workdir)
        )
    assert not isinstance(error.value, (faults.CheckpointWriteError, config_lib.ConfigError))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


# ----------------------------------------------------------------------------- lost process

# fva_jax.main, where process 1 sends itself SIGTERM (FVA_FAULT=SIGTERM) or SIGKILL
# (FVA_FAULT=SIGKILL) once step FVA_FAULT_AFTER is done: while it makes the batch of step
# FVA_FAULT_AFTER + 2 (batches are made 2 steps ahead).
_RUNNER = """
import os, signal
import jax
from absl import app
from fva_jax.training import experiment
from fva_jax import main as fva_main

fault, after = os.environ["FVA_FAULT"], int(os.environ["FVA_FAULT_AFTER"])
original, made = experiment.global_batch, []

def global_batch(run, local):
    made.append(1)
    if jax.process_index() == 1 and len(made) == after + 2 - int(os.environ["FVA_START"]):
        print("FAULT", fault, flush=True)
        os.kill(os.getpid(), getattr(signal, fault))
    return original(run, local)

experiment.global_batch = global_batch
jax.config.config_with_absl()
app.run(fva_main.main, flags_parser=fva_main._parse_flags)
"""

# The sampling baseline: every epoch sampled (3 steps of 4 videos), one program to train.
SAMPLED_ONLY = {"model.sampling": "uniform", "train.uniform_warmup_epochs": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sigterm_then_a_lost_process_then_both_resume(
    data_dir, compile_cache, tmp_path
):
    """Two processes (gloo) of the sampling baseline (2 epochs of 3 steps: few programs to
    compile), started three times in one workdir:

    1. process 1 gets SIGTERM after step 1: JAX's preemption sync point stops both at the
       same step (2-4, as JAX's coordination decides), both checkpoint it together and exit
       with status 75;
    2. both resume from it; process 1 dies (SIGKILL) after step 4: process 0 exits with
       status 69 and one line saying a process was lost and where the run resumes, well
       within distributed.heartbeat_timeout_s, instead of aborting in JAX's shutdown barrier;
    3. both resume from the latest checkpoint (3, or the sync step if later) and finish with
       the same metrics.
    """
    heartbeat_s = 30
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    workdir = tmp_path / "run"

    def start(fault: str, after: int, start_step: int):
        port = _free_port()
        env = {
            **_env(compile_cache),
            "FVA_FAULT": fault,
            "FVA_FAULT_AFTER": str(after),
            "FVA_START": str(start_step),
        }
        return [
            subprocess.Popen(
                [
                    sys.executable,
                    str(runner),
                    "--config=configs/demo.py",
                    f"--workdir={workdir}",
                    *flags_for(data_dir, **SAMPLED_ONLY),
                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                    "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={i}",
                    f"--config.distributed.heartbeat_timeout_s={heartbeat_s}",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]

    def finish(procs, timeout=300) -> list[str]:
        try:
            return [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    def stderr_lines(log: str) -> list[str]:
        return [line for line in log.splitlines() if line.startswith("fva_jax.main:")]

    # 1. SIGTERM to process 1.
    procs = start("SIGTERM", after=1, start_step=0)
    logs = finish(procs)
    for p, log in zip(procs, logs):
        assert p.returncode == faults.EXIT_PREEMPTED, log[-4000:]
    stopped = [re.findall(r"fva_jax.main: stopped by SIGTERM at step (\d+)", log) for log in logs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, logs[0][-3000:]
    synced = int(stopped[0][0])
    # JAX picks the sync step; under load process 0 may run a step further ahead.
    assert 2 <= synced <= 4
    assert checkpoint_steps(workdir) == sorted({synced} | ({3} if synced > 3 else set()))
    latest = max(synced, 3)  # phase 2 adds the periodic checkpoint 3 if it stopped earlier

    # 2. Process 1 lost.
    procs = start("SIGKILL", after=4, start_step=synced)
    try:
        victim_log, _ = procs[1].communicate(timeout=240)
        died = time.monotonic()
        assert procs[1].returncode == -signal.SIGKILL, victim_log[-3000:]
        survivor_log, _ = procs[0].communicate(timeout=heartbeat_s + 60)
        took = time.monotonic() - died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert f"Resumed from checkpoint step {synced}" in survivor_log
    assert procs[0].returncode == faults.EXIT_LOST_PROCESS, survivor_log[-4000:]
    assert took < heartbeat_s, took
    lines = stderr_lines(survivor_log)
    assert len(lines) == 1, survivor_log[-3000:]
    assert "process 0 of 2: another process of this run was lost (" in lines[0]
    assert f"they resume from checkpoint step {latest} in {workdir / 'checkpoints'}" in lines[0]

    # 3. Both again, nobody fails.
    procs = start("SIGKILL", after=100, start_step=latest)
    logs = finish(procs)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
        assert f"Resumed from checkpoint step {latest}" in log
    finals = [json.loads(re.findall(r"FINAL_METRICS (\{.*\})", log)[-1]) for log in logs]
    assert finals[0] == finals[1] and finals[0]["step"] == 6
