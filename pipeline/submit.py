"""`python -m pipeline.submit CONFIG [key=value ...] [job options]`: one run on SLURM (the code:
pipeline/cluster/submit.py)."""
import sys

from pipeline.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
