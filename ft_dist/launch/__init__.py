"""Launch-side code: runs in the process that starts jobs, never inside the training loop.

- `schema`: the `cluster` config group (nodes, processes per node, partition, time, env) and `ft-launch`'s config.
- `rendezvous`: the head node's address and a port, resolved inside a Slurm allocation.
- `node`: torchrun for one node, keeping the training's exit code (85 = requeue) and forwarding SIGUSR1.
- `sbatch`: writes the sbatch script for N nodes x G processes from a cluster config and training overrides.
- `sweep`: Hydra multirun members as multi-process jobs, and the sweep summary table.
- `wandb_sweep`: a W&B sweep YAML from a Hydra sweep spec, and the agent that starts multi-process trials.

Nothing here imports torch at module level: these run on login nodes and in batch shells.
"""
