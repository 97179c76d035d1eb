"""The launchers (launch/): what `launch/tpu_vm.sh` ships to the workers, and the virtual
environments they make stay out of git."""

import os
import pathlib
import re
import subprocess
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"


def _git(repo, *args) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def _pack(repo, out, **env):
    """`launch/tpu_vm.sh pack OUT` run in `repo`, with no TPU settings and a `gcloud` that
    records any call."""
    bin_dir = repo.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\necho called >> {repo.parent / 'gcloud_calls'}\nexit 1\n")
    gcloud.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT")}
    return subprocess.run(
        ["bash", str(repo / "launch" / "tpu_vm.sh"), "pack", str(out)],
        cwd=repo,
        env={**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _members(archive) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_pack_ships_the_committed_tracked_files_only(tmp_path):
    """In a git repository with a launcher, a virtual environment, a workdir, an untracked
    file and a cache: the archive holds exactly the tracked files of HEAD. Uncommitted
    changes to a tracked file are refused (one message naming ALLOW_DIRTY, no archive);
    ALLOW_DIRTY=1 ships HEAD's content. No gcloud call, no TPU settings."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "launch" / "tpu_vm.sh").write_bytes(TPU_VM.read_bytes())
    (repo / "fva_jax").mkdir()
    (repo / "fva_jax" / "model.py").write_text("COMMITTED = True\n")
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    for junk in (".venv-gpu/bin/python", ".ci-venv/lib/x.py", "workdir1/ckpt", "notes.txt"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_text("not shipped\n")
    (repo / "fva_jax" / "__pycache__").mkdir()
    (repo / "fva_jax" / "__pycache__" / "model.pyc").write_bytes(b"\0")
    tracked = set(_git(repo, "ls-files").split())

    out = _pack(repo, tmp_path / "out")
    assert out.returncode == 0, out.stderr
    members = _members(tmp_path / "out" / "fva_jax.tar.gz")
    assert set(members) == tracked == {".gitignore", "fva_jax/model.py", "launch/tpu_vm.sh"}

    (repo / "fva_jax" / "model.py").write_text("COMMITTED = False\n")
    out = _pack(repo, tmp_path / "dirty")
    assert out.returncode != 0
    assert "ALLOW_DIRTY=1" in out.stderr and "fva_jax/model.py" in out.stderr, out.stderr
    assert not (tmp_path / "dirty").exists()

    out = _pack(repo, tmp_path / "allowed", ALLOW_DIRTY="1")
    assert out.returncode == 0, out.stderr
    members = _members(tmp_path / "allowed" / "fva_jax.tar.gz")
    assert set(members) == tracked and members["fva_jax/model.py"] == b"COMMITTED = True\n"
    assert not (tmp_path / "gcloud_calls").exists()


def test_the_launchers_virtual_environments_are_ignored_by_git():
    """Every virtual environment that launch/gpu.sh and .ci/run make (their defaults) is in
    .gitignore, so that neither `git status` nor a `git archive` sees it."""
    gpu = re.search(r'VENV="\$\{VENV:-([^}]+)\}"', (ROOT / "launch" / "gpu.sh").read_text())
    ci = re.search(r'venv="\$\{FVA_CI_VENV:-([^}]+)\}"', (ROOT / ".ci" / "run").read_text())
    venvs = [gpu.group(1), ci.group(1), ".venv"]
    assert venvs[:2] == [".venv-gpu", ".ci-venv"]
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--no-index", *[f"{v}/bin/python" for v in venvs]],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == [f"{v}/bin/python" for v in venvs]


def test_workers_install_the_training_requirements_without_tensorflow():
    """`install`: every worker installs requirements.txt less tensorflow-cpu (the filter
    drops that line and only it); worker 0, which builds the data set, all of it."""
    script = TPU_VM.read_text()
    install = script[script.index("  install)") : script.index("  prepare)")]
    grep = re.search(r"grep -v '([^']+)' requirements.txt", install).group(1)
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    dropped = [line for line in requirements if re.search(grep, line)]
    assert [line.split("==")[0] for line in dropped] == ["tensorflow-cpu"]
    worker_0 = install.split("--worker=0", 1)[1]
    assert "-r requirements.txt" in worker_0 and "--worker=all" not in worker_0
