"""Train and test one experiment: python train.py --config hash_64bit.yaml [key=value ...]

The command line of pipeline/training/cli.py (installed as `fico-train`); `--help` lists its options.
"""
import sys

from pipeline.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
