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


def test_clustering_example_runs_and_prints_segment_sizes():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    proc = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    sizes = np.array(
        [[int(v) for v in re.findall(r"\d+", row)] for row in proc.stdout.strip().splitlines()]
    )
    # 8 non-empty segments per video, covering its 300 and 180 valid frames
    assert sizes.shape == (2, 8) and (sizes > 0).all()
    np.testing.assert_array_equal(sizes.sum(axis=1), [300, 180])
