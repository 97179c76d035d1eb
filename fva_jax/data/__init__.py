"""Video decoding, TFDS dataset builders, batch plans and the input pipeline.

Kept import-free. Nothing here imports TensorFlow to read data (pipeline.py reads ArrayRecord
files with NumPy); building a data set through TFDS may.
"""
