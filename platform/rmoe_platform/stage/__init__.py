"""One training stage on Ray Train, split where the work runs.

Driver side (this process): `prepare` validates a stage before anything starts (config, model, data,
storage), `data` builds its streaming Ray Datasets, `run` launches the `TorchTrainer` and returns the
result; `payload` is what the driver hands every worker, packed with each stage's outline by `loop_config`.

Worker side (`stage.worker`, inside the Ray Train workers): the per-worker loop, model building,
trainable groups, the optimizer, checkpoints and expert parallelism. The driver imports worker modules
only to build the model once without weights, for validation.
"""
