"""Raw datasets -> WebDataset shards + a `dataset.json` card (+ `tokenizer.json`).

Run `python -m data_prep --help`. Nothing here imports from `pipeline`; what `pipeline` uses of this
package is published below and nowhere else: the dataset contract (the card and its reader, the
sample schema), the shard and atomic-file writers, the resumable build, the shapes dataset and the
pretraining images of its backbone, and the progress bar every command line shares.
"""
from .build import ResumableBuild
from .card import CARD_NAME, DataError, DatasetCard, make_card, read_card, split_entry, write_card
from .entries import InputError
from .fsutil import TMP_MARK, atomic_open, atomic_write_bytes, remove_tree, tmp_sibling
from .progress import progress_bar
from .schema import (IMAGE_FEATURES_KEY, IMAGE_KEYS, IMAGE_TOKENS_KEY, TEXT_FEATURES_KEY, TEXT_MASK_KEY,
                     TEXT_TOKENS_KEY)
from .shapes import build_shapes, single_object_images
from .shapes_draw import SHAPES
from .shards import write_shard, write_split
from .tokenizer import train_wordpiece
from .urls import describe_error, is_url, safe_name
from .wds import LAYOUT as WDS_LAYOUT, build_wds_card, caption_of, split_key

__all__ = ["CARD_NAME", "DataError", "DatasetCard", "IMAGE_FEATURES_KEY", "IMAGE_KEYS", "IMAGE_TOKENS_KEY",
           "InputError", "ResumableBuild", "SHAPES", "TEXT_FEATURES_KEY", "TEXT_MASK_KEY", "TEXT_TOKENS_KEY",
           "TMP_MARK", "atomic_open", "atomic_write_bytes", "build_shapes", "make_card", "progress_bar", "read_card",
           "remove_tree", "single_object_images", "split_entry", "tmp_sibling", "train_wordpiece", "write_card",
           "write_shard", "write_split", "WDS_LAYOUT", "build_wds_card", "caption_of", "describe_error", "is_url",
           "safe_name", "split_key"]
