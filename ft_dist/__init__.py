"""ft-dist: finetune LLMs from a laptop CPU to many-node GPU clusters."""

EXIT_OK = 0
EXIT_USER_ERROR = 2
"""A config or data mistake, reported in one line."""
EXIT_DIVERGED = 3
"""Training stopped after train.nonfinite_limit NaN/Inf steps in a row; a checkpoint from before them was saved."""
EXIT_REQUEUE = 85
"""Checkpointed after a preemption signal (SIGTERM/SIGUSR1): please requeue; train.resume=auto continues."""
EXIT_HANG = 86
"""A rank made no progress for train.hang_timeout_s: stacks dumped to output_dir/heartbeat/; restart to resume."""
