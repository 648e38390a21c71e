"""Training: the run (unift.train.run), the Trainer subclass, checkpoints, progress and scaling engines."""
