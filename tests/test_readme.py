"""The README stays true to the code: its test command is CI's, its code example runs."""

import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_verbatim():
    bash = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    test_command = bash[bash.index("# Run the tests") + 1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, (test_command, ci)
    # the default tests need no torch (5 GB): only the opt-in FVA_TORCH_TESTS=1 tests use it
    assert "torch" not in test_command and "torch" not in (ROOT / "requirements.txt").read_text()
    # the main-job command is the first one and uses a config that exists
    main_command = bash[1]
    config = re.search(r"--config=(\S+)", main_command).group(1)
    assert (ROOT / config).is_file(), main_command


def _run_example(example: str) -> subprocess.CompletedProcess:
    """A README code block run as a fresh Python process on the CPU, from the repository."""
    return subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def test_clustering_example_runs_and_prints_segment_sizes():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    proc = _run_example(example)
    assert proc.returncode == 0, proc.stderr
    sizes = np.array(
        [[int(v) for v in re.findall(r"\d+", row)] for row in proc.stdout.strip().splitlines()]
    )
    # 8 non-empty segments per video, covering its 300 and 180 valid frames
    assert sizes.shape == (2, 8) and (sizes > 0).all()
    np.testing.assert_array_equal(sizes.sum(axis=1), [300, 180])


def test_own_backbone_example_trains_as_printed():
    """The "Your own backbone" example runs exactly as printed: FullVideo around a small CNN,
    two optax steps, a finite loss that the first step lowers."""
    section = README.split("## Your own backbone", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = _run_example(example)
    assert proc.returncode == 0, proc.stderr
    losses = [float(x) for x in re.findall(r"^step \d: loss (\S+)$", proc.stdout, re.M)]
    assert len(losses) == 2 and np.isfinite(losses).all(), proc.stdout
    assert losses[1] < losses[0], losses
    assert 0 < losses[0] < 10, losses  # cross-entropy of 5 classes at initialisation: ~ln 5


def test_references_point_into_the_repository():
    """Links in README.md and docs/*.md name files of the repository, and every
    `docs/DESIGN.md §N` cited anywhere in the code names a section that exists."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "shared/" not in text, f"{doc.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    cited = []
    files = [ROOT / "README.md"]
    for folder in ("fva_jax", "configs", "benchmarks", "launch", "tests", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
    for path in files:
        for section in re.findall(r"docs/DESIGN\.md\)? §(\d+)", path.read_text()):
            cited.append(section)
            assert section in sections, f"{path.relative_to(ROOT)} cites docs/DESIGN.md §{section}"
    assert cited  # the pattern matches the way the code cites it


# A repository path in the docs: it begins with one of the repository's top-level folders or
# files, not after a letter, `/`, `.`, `$` or `~` (so `/tmp/tests/x`, `WORKDIR/checkpoints`,
# `gs://b/docs` and the paths inside a data set's download, e.g. `UCF-101/...`, are not).
_TOP_LEVEL = (
    r"(?:fva_jax|configs|launch|tests|benchmarks|docs|\.ci)/"
    r"|requirements[\w-]*\.txt|pyproject\.toml|README\.md"
)
_REPO_PATH = re.compile(rf"(?<![\w/.$~-])(?:{_TOP_LEVEL})[\w./*{{}},<>-]*")


def _repository_paths(text):
    """The repository paths a doc cites, as globs: `{a,b}` names each of a and b, and a
    placeholder (`<name>`, or the word `NAME`) stands for any name (`*`)."""
    for match in _REPO_PATH.findall(text):
        path = match.rstrip(".,:;")
        brace = re.search(r"\{([^{}]*)\}", path)
        options = brace.group(1).split(",") if brace else [""]
        for option in options:
            full = path[: brace.start()] + option + path[brace.end() :] if brace else path
            yield match, re.sub(r"<[^<>/]*>|\bNAME\b", "*", full)


def test_repository_paths_in_the_docs_exist():
    """Every path into the repository that README.md or docs/*.md cites exists (a glob matches
    at least one file), so a renamed or deleted file cannot stay cited."""
    missing, checked = [], 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cited, pattern in _repository_paths(doc.read_text()):
            checked += 1
            if not any(ROOT.glob(pattern.rstrip("/"))):
                missing.append(f"{doc.relative_to(ROOT)}: {cited}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)
    assert checked > 50  # the pattern finds the docs' many references


def test_docs_are_cited_with_their_folder():
    """Code, configs, scripts and tests cite `docs/DESIGN.md` and `docs/DATASETS.md` with the
    folder, so the reference leads to the file from anywhere in the repository."""
    bare = re.compile(r"(?<!docs/)\b(?:DESIGN|DATASETS)\.md")
    found = []
    for folder in ("fva_jax", "configs", "benchmarks", "launch", "tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".sh", ".md") or path == pathlib.Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if bare.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "cite docs/DESIGN.md / docs/DATASETS.md, not the bare name:\n" + "\n".join(
        found
    )
