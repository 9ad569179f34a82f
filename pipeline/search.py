"""`python -m pipeline.search index --run RUN --images DIR --out INDEX` and `python -m pipeline.search query
--index INDEX --text "a red circle" -k 10`: search your own images and texts with a trained run (the code:
pipeline/inference/search.py)."""
import sys

from pipeline.inference.search import main

if __name__ == "__main__":
    sys.exit(main())
