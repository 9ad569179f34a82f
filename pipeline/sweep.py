"""`python -m pipeline.sweep SWEEP.yaml [--grid | --local]` and `--collect DIR` (the code:
pipeline/cluster/sweep_launch.py and sweep_collect.py)."""
import sys

from pipeline.cluster.sweep_launch import main

if __name__ == "__main__":
    sys.exit(main())
