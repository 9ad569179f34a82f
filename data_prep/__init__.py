"""Raw datasets -> WebDataset shards + a `dataset.json` card (+ `tokenizer.json`).

Run `python -m data_prep --help`. Nothing here imports from `pipeline`.
"""
from .card import CARD_NAME, read_card, write_card
from .shapes import build_shapes
from .shards import write_split
from .tokenizer import train_wordpiece

__all__ = ["CARD_NAME", "build_shapes", "read_card", "train_wordpiece", "write_card", "write_split"]
