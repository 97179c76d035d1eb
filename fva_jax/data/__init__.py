"""Video decoding, TFDS dataset builders and the input pipeline.

Kept import-free: TensorFlow is loaded only by the submodules that need it.
"""
