"""`python -m pipeline.export RUN --out DIR`: a trained run as a small folder to share (safetensors weights,
config, tokenizer, model card; the code: pipeline/inference/export.py)."""
import sys

from pipeline.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
