"""One split of a dataset encoded with a trained run, timed per side.

    enc = encode_split(run, "test", device="cpu")  # features in id order, ready for evaluate()

The split is read by the same evaluation stream as training's test (every record exactly once) and
put in id order the way ``RetrievalMetrics.compute`` does, so ``evaluate`` on the result reproduces
the run's own ``test_metrics.json``.

Encoding time is measured per side, model forward only (encoder + head, what a deployed system pays
per item): data loading, decoding and tokenisation are excluded, the first batch is run once untimed
(allocator and kernel warm-up), and on CUDA the clock waits for the device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipeline.cli import progress_bar
from pipeline.data import build_stream
from pipeline.evaluation.metric import first_by_id
from pipeline.inference.runs import Run, RunError
from pipeline.models.token_scorers import TokenSet


@dataclass
class EncodedSplit:
    """One split in id order: images ``[N, ...]``, captions ``[M, ...]``, ``caption_image [M]``."""

    image: np.ndarray  # continuous outputs: embeddings (fine-grained) or tanh relaxations (hash)
    text: np.ndarray
    image_gallery: np.ndarray  # what retrieval uses: embeddings, or packed uint8 codes
    text_gallery: np.ndarray
    caption_image: np.ndarray
    labels: np.ndarray  # [N, C] multi-hot
    image_ids: np.ndarray
    text_ids: np.ndarray
    timing: dict = field(default_factory=dict)
    # nested codes: bits -> (image, text) packed codes of that prefix (the module's gallery_features(x, bits))
    prefix_galleries: dict = field(default_factory=dict)
    # token-level runs only (None otherwise): what the run's token_scorer compares, padded to the split's
    # longest token set; `image_gallery` / `text_gallery` are then the global embeddings that screen
    image_tokens: np.ndarray | None = None  # [N, R, D]
    image_mask: np.ndarray | None = None  # [N, R] bool
    text_tokens: np.ndarray | None = None  # [M, W, D]
    text_mask: np.ndarray | None = None  # [M, W] bool

    @property
    def has_tokens(self) -> bool:
        return self.image_tokens is not None

    def token_sets(self) -> tuple[TokenSet, TokenSet]:
        """(images, captions) as the token scorer takes them (CPU tensors sharing the arrays' memory)."""
        return (TokenSet(torch.from_numpy(self.image_tokens), torch.from_numpy(self.image_mask)),
                TokenSet(torch.from_numpy(self.text_tokens), torch.from_numpy(self.text_mask)))

    def prefix(self, bits: int) -> "EncodedSplit":
        """The split as the model's first `bits` bits see it (a nested code's prefix): its packed codes and
        the first `bits` of the continuous outputs."""
        if bits not in self.prefix_galleries:
            raise ValueError(f"no {bits}-bit prefix: this model's prefixes are {sorted(self.prefix_galleries)}")
        image_gallery, text_gallery = self.prefix_galleries[bits]
        return replace(self, image=self.image[:, :bits], text=self.text[:, :bits], image_gallery=image_gallery,
                       text_gallery=text_gallery, prefix_galleries={})

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.text.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first(x, n: int):
    """The first `n` rows of a batch's input (a tensor, or a dict of them)."""
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def _to(x, device):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


@torch.inference_mode()
def encode_split(run: Run, split: str = "test", device="cpu", batch_size: int | None = None,
                 progress: bool = True, limit_batches: int | None = None) -> EncodedSplit:
    """Encode every record of ``split`` with the run's model; ``timing`` holds per-side seconds."""
    device = torch.device(device)
    module = run.module.to(device).eval()
    dm, cfg = run.datamodule, run.cfg
    bs = batch_size or cfg.data.eval_batch_size
    loader, _ = build_stream(dm.card, split, train=False, batch_size=bs, rank=0, world=1,
                             num_workers=cfg.data.num_workers, seed=cfg.run.seed, epoch=dm.epoch,
                             tokenizer=dm.tokenizer, max_text_len=cfg.data.max_text_len, transform=dm.transform,
                             reader=dm.reader)

    image_side, text_side = module.encode_images_with_tokens, module.encode_texts_with_tokens
    parts = {k: [] for k in ("img", "txt", "image_ids", "labels", "text_ids", "text_image_ids", "img_tokens",
                             "txt_tokens")}
    t_img = t_txt = 0.0
    warm = False
    bar = progress_bar(dm.card.num_images(split), f"encode {run.name} ({split})", progress, "img")
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        images, text = _to(batch["images"], device), _to(batch["text"], device)
        if not warm:  # one untimed pass: allocator, kernel selection, lazy init
            image_side(_first(images, 8))
            text_side(_first(text, 8))
            warm = True
        _sync(device)
        t0 = time.perf_counter()
        img, img_tokens = image_side(images)
        _sync(device)
        t1 = time.perf_counter()
        txt, txt_tokens = text_side(text)
        _sync(device)
        t_img += t1 - t0
        t_txt += time.perf_counter() - t1
        parts["img"].append(img.float().cpu())
        parts["txt"].append(txt.float().cpu())
        if img_tokens is not None:
            parts["img_tokens"].append(img_tokens.to("cpu"))
            parts["txt_tokens"].append(txt_tokens.to("cpu"))
        for key in ("image_ids", "labels", "text_ids", "text_image_ids"):
            parts[key].append(batch[key].cpu())
        bar.update(len(batch["image_ids"]))
    bar.close()
    if not parts["img"]:
        raise RunError(f"{run.path}: split '{split}' yielded no records")
    token_parts = {side: parts.pop(f"{side}_tokens") for side in ("img", "txt")}
    tokens = {side: TokenSet.cat(sets) if sets else None for side, sets in token_parts.items()}
    cat = {k: torch.cat(v) for k, v in parts.items()}
    # id order, first copy of each id: what RetrievalMetrics.compute does with the same batches
    img_order, _ = first_by_id(cat["image_ids"])
    txt_order, _ = first_by_id(cat["text_ids"])
    img_ids = cat["image_ids"][img_order]
    txt_img = cat["text_image_ids"][txt_order]
    caption_image = torch.searchsorted(img_ids, txt_img)
    if bool((caption_image >= len(img_ids)).any()) or bool((img_ids[caption_image.clamp_max(len(img_ids) - 1)]
                                                              != txt_img).any()):
        raise RunError(f"{run.path}: captions of split '{split}' refer to images that were not read")
    image, text = cat["img"][img_order], cat["txt"][txt_order]
    image_gallery, text_gallery = module.gallery_features(image), module.gallery_features(text)
    prefixes = {bits: (module.gallery_features(image, bits).numpy(), module.gallery_features(text, bits).numpy())
                for bits in module.prefixes}
    n, m = len(img_order), len(txt_order)
    timing = {"device": str(device), "batch_size": bs, "threads": torch.get_num_threads(),
              "image_seconds": t_img, "text_seconds": t_txt, "images": n, "texts": m,
              "captions_per_batch": m / max(1, len(parts["img"]))}
    enc = EncodedSplit(image.numpy(), text.numpy(), image_gallery.numpy(), text_gallery.numpy(),
                       caption_image.numpy(), (cat["labels"][img_order] != 0).numpy().astype(np.uint8),
                       img_ids.numpy(), cat["text_ids"][txt_order].numpy(), timing, prefix_galleries=prefixes)
    if tokens["img"] is not None:
        img_set, txt_set = tokens["img"][img_order], tokens["txt"][txt_order].trimmed()
        enc.image_tokens, enc.image_mask = img_set.tokens.float().numpy(), img_set.mask.numpy()
        enc.text_tokens, enc.text_mask = txt_set.tokens.float().numpy(), txt_set.mask.numpy()
    return enc
