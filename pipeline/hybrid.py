"""`python -m pipeline.hybrid --fine-grained RUN [--hash RUN ...]`: hash screening + fine-grained re-ranking
(the code: pipeline/comparison/hybrid.py)."""
import sys

from pipeline.comparison.hybrid import main

if __name__ == "__main__":
    sys.exit(main())
