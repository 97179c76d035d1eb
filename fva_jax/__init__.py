"""fva_jax: full video action recognition in JAX/Flax.

`fva_jax.clustering` is the reusable library and imports only JAX and NumPy;
the training stack (`fva_jax.models`, `fva_jax.data`, `fva_jax.training.train`) needs the
`train` extra. This file imports nothing so that the library stays light.
"""

__version__ = "0.1.0"
