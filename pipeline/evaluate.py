"""`python -m pipeline.evaluate`: the protocol on saved features (the code: pipeline/evaluation/cli.py)."""
import sys

from pipeline.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
