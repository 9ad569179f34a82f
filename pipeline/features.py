"""`python -m pipeline.features --shards DIR --config CFG --out DIR`: frozen-encoder feature shards
(the code: pipeline/inference/features.py)."""
import sys

from pipeline.inference.features import main

if __name__ == "__main__":
    sys.exit(main())
