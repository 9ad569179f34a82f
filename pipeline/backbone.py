"""`python -m pipeline.backbone --config CFG`: make the shapes backbone now (the code:
pipeline/training/backbone.py)."""
import sys

from pipeline.training.backbone import main

if __name__ == "__main__":
    sys.exit(main())
