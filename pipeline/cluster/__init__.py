"""The cluster room: SLURM job submission and sweeps. Imports `pipeline.config` only (no torch: these
tools answer in well under a second); the jobs they submit run train.py from the repository.

    submit.py         python -m pipeline.submit: one run, the job shape taken from the config
    sweep_launch.py   python -m pipeline.sweep: W&B agents, grid arrays, local grids, trial resume
    sweep_collect.py  python -m pipeline.sweep --collect: finished runs -> one table and plot
"""
