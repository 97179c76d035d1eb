"""Command-line tools for users: `python -m fva_jax.tools.<name>`.

predict (classify videos with a trained run), visualize (a picture of a video's clusters),
clustering_demo (cluster any video with fixed random features, no training), import_weights
(torchvision ImageNet weights -> pretrained.npz); user_video reads a user's video for the first
two. The trainer never imports this package.
"""
