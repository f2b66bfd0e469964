"""What runs inside each Ray Train worker of a stage: `entry` (the train function), `loop` (the stages'
training), `model` (the model a stage trains), `trainable` (named parameter groups), `optim`, `checkpoints`
(resumable on any worker count) and `expert_parallel` (experts sharded over ranks, applied from outside the
model)."""
