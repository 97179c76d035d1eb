"""`python tests/run_main.py <fva_jax.main flags>`: fva_jax.main (the real data pipeline) in
its own process, for trainer tests that need one (several devices, several processes, no
TensorFlow).

FVA_BLOCK_TENSORFLOW=1: an import hook placed first on sys.meta_path, before anything is
imported, makes `import tensorflow` (and tensorflow.*) fail; the last line printed is
"TENSORFLOW_IMPORTED False" (or True) when the run is over. The data set must be built
beforehand (building may import TensorFlow; training must not).

FVA_RECORD_DATA_STEPS=1: the trainer reads through tests/recorded_pipeline.py, which logs
every step it reads as a "DATA_STEP [...]" line.
"""

import importlib.abc
import importlib.util
import os
import pathlib
import sys


class _BlockTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds tensorflow and tensorflow.* first and fails to load them with ImportError. (A
    finder that raised in find_spec would also break importlib.util.find_spec probes, e.g.
    etils', which on a machine without TensorFlow just return None.)"""

    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked in this test process")

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is blocked in this test process")


def main() -> None:
    block = os.environ.get("FVA_BLOCK_TENSORFLOW") == "1"
    if block:
        sys.meta_path.insert(0, _BlockTensorFlow())
        try:
            import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
        except ImportError:
            pass
        else:
            raise SystemExit("the import hook did not block tensorflow")
    import jax  # pylint: disable=g-import-not-at-top
    from absl import app  # pylint: disable=g-import-not-at-top

    from fva_jax import main as fva_main  # pylint: disable=g-import-not-at-top

    if os.environ.get("FVA_RECORD_DATA_STEPS") == "1":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        import recorded_pipeline  # pylint: disable=g-import-not-at-top

        from fva_jax.training import train  # pylint: disable=g-import-not-at-top

        train._default_data = lambda: recorded_pipeline  # pylint: disable=protected-access
    jax.config.config_with_absl()
    try:
        app.run(fva_main.main, flags_parser=fva_main._parse_flags)  # pylint: disable=protected-access
    finally:
        if block:
            print(f"TENSORFLOW_IMPORTED {'tensorflow' in sys.modules}", flush=True)


if __name__ == "__main__":
    main()
