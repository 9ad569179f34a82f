"""The sample schema: what a shard record holds, shared by the writers here and the reader in
`pipeline.data`.

One record = one image:
- `__key__`: an id unique in the dataset, without '.' or '/' (e.g. `coco_000000391895`);
- the image: encoded bytes under `jpg` (real datasets), `png` (shapes) or `webp`, or, in feature
  shards, `img.npy` (the image encoder's global vector, [D]); the card's `image_key` names it;
- `json`: {"id", "index", "captions": [str, ...], "labels": [int, ...], "split"}: every caption of the
  image, the indices of its categories in the card's list, and `index`, its dense position in its split
  (0..num_images-1): per-item training state and evaluation ids are keyed on it;
- feature shards add `txt.npy` (one row per json caption, in order, [C, D]) and with tokens
  `img_tokens.npy` [T, D], `txt_tokens.npy` [C, L, D], `txt_mask.npy` [C, L] (bool).
"""
from __future__ import annotations

IMAGE_KEYS = ("jpg", "png", "webp")
IMAGE_FEATURES_KEY = "img.npy"
TEXT_FEATURES_KEY = "txt.npy"
IMAGE_TOKENS_KEY = "img_tokens.npy"
TEXT_TOKENS_KEY = "txt_tokens.npy"
TEXT_MASK_KEY = "txt_mask.npy"
