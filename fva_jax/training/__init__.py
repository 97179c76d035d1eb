"""The trainer: `train.train_and_evaluate(config, workdir)` and `train.evaluate`, the run a
config builds (experiment, epochs, optim), the steps, evaluation, checkpoints, faults,
TensorBoard summaries and timeline pictures, multi-host set-up. See docs/DESIGN.md §3."""
