"""`python -m pipeline.report RUN [RUN ...] --out DIR`: the FiCo-ITR comparison of trained runs (the code:
pipeline/comparison/report.py)."""
import sys

from pipeline.comparison.report import main

if __name__ == "__main__":
    sys.exit(main())
