"""Run machinery: the command line (`arguments`), the checkpoint schema
(`state`) and files (`checkpoint_files`), the run directory and its lock
(`run_directory`), data parallelism (`distributed`), random-generator state
(`rng`), the training device (`device`), signals (`signals`) and atomic
output files (`files`)."""
