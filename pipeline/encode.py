"""A trained run back in memory, and one split encoded with it, timed per side.

    run = load_run("runs/hash_64bit")             # config.yaml + checkpoints/best.ckpt
    enc = encode_split(run, "test", device="cpu")  # features in id order, ready for evaluate()

Modules take their encoders injected, so a run is rebuilt from its own resolved config with
``build_module`` and the checkpoint's ``state_dict`` is loaded into it (strictly: a mismatch
is an error, never a silently half-loaded model). The split is read by the same evaluation
stream as training's test (every record exactly once) and put in id order the way
``RetrievalMetrics.compute`` does, so ``evaluate`` on the result reproduces the run's own
``test_metrics.json``.

Encoding time is measured per side, model forward only (encoder + head, what a deployed
system pays per item): data loading, decoding and tokenisation are excluded, the first batch
is run once untimed (allocator and kernel warm-up), and on CUDA the clock waits for the device.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import progress_bar
from pipeline.heads import binarize
from pipeline.retrieval import pack_codes


class RunError(ValueError):
    """A run directory that cannot be used, explained in one line."""


@dataclass
class Run:
    path: Path
    name: str
    cfg: object
    module: torch.nn.Module
    datamodule: object
    checkpoint: Path

    @property
    def family(self) -> str:
        return "hash" if self.cfg.model.kind == "hash" else "fine_grained"

    @property
    def measure(self) -> str:
        return self.module.measure

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.module.ks)

    @property
    def dim(self) -> int:
        return int(self.cfg.model.bits if self.family == "hash" else self.cfg.model.embed_dim)

    @property
    def representation(self) -> str:
        return f"{self.dim}-bit codes" if self.family == "hash" else f"{self.dim}-d fp32"

    def test_metrics(self) -> dict | None:
        import json

        path = self.path / "test_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None


def load_run(run_dir, data_root: str | None = None, num_workers: int | None = None,
             checkpoint: str = "best") -> Run:
    """Rebuild a run's module from ``config.yaml`` and load ``checkpoints/<checkpoint>.ckpt``
    (``best``, falling back to ``last``). ``data_root`` overrides the dataset folder (moved data)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.data import DataError, RetrievalDataModule
    from pipeline.modules import build_module

    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RunError(f"{path}: no config.yaml (not a run directory written by train.py)")
    overrides = [f"data.root={data_root}"] if data_root else []
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    try:
        cfg = load_config(str(path / "config.yaml"), overrides)
        dm = RetrievalDataModule(cfg.data, seed=cfg.run.seed)
    except (ConfigError, DataError) as e:
        raise RunError(f"{path}: {e}") from None
    ckpt = next((p for p in (path / "checkpoints" / f"{name}.ckpt" for name in (checkpoint, "last"))
                 if p.is_file()), None)
    if ckpt is None:
        raise RunError(f"{path}: no checkpoints/{checkpoint}.ckpt or last.ckpt")
    tok = dm.tokenizer
    module = build_module(cfg, dm.card.num_images("train"), len(tok), tok.pad_token_id or 0, load_init=False)
    module.load_state_dict(load_checkpoint(ckpt)["state_dict"], strict=True)
    module.eval()
    return Run(path, cfg.run.name or path.name, cfg, module, dm, ckpt)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain data: tensors, dicts, lists, strings and numbers only (weights_only), so that a
    run folder from someone else cannot run code here; anything else is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("Unsupported global: ")[-1].split(" was not")[0].strip()[:120]
        raise RunError(f"{path}: refused: it holds Python objects beyond tensors and plain data ({what}), and "
                       f"unpickling them could run code; only load such a file if you trust where it came "
                       f"from") from None


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

    @property
    def num_images(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.text.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(x, device):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


@torch.inference_mode()
def encode_split(run: Run, split: str = "test", device="cpu", batch_size: int | None = None,
                 progress: bool = True, limit_batches: int | None = None) -> EncodedSplit:
    """Encode every record of ``split`` with the run's model; ``timing`` holds per-side seconds."""
    from pipeline.data import build_stream

    device = torch.device(device)
    module = run.module.to(device).eval()
    dm, cfg = run.datamodule, run.cfg
    bs = batch_size or cfg.data.eval_batch_size
    loader, _ = build_stream(dm.card, split, train=False, batch_size=bs, rank=0, world=1,
                             num_workers=cfg.data.num_workers, seed=cfg.run.seed, epoch=dm.epoch,
                             tokenizer=dm.tokenizer, max_text_len=cfg.data.max_text_len, transform=dm.transform)

    def image_side(images):
        return module.image_head(module.image_encoder(images).vector)

    def text_side(text):
        return module.text_head(module.text_encoder(**text).vector)

    parts = {k: [] for k in ("img", "txt", "image_ids", "labels", "text_ids", "text_image_ids")}
    t_img = t_txt = 0.0
    warm = False
    bar = progress_bar(dm.card.num_images(split), f"encode {run.name} ({split})", progress, "img")
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        images, text = _to(batch["images"], device), _to(batch["text"], device)
        if not warm:  # one untimed pass: allocator, kernel selection, lazy init
            image_side(images[:8])
            text_side({k: v[:8] for k, v in text.items()})
            warm = True
        _sync(device)
        t0 = time.perf_counter()
        img = image_side(images)
        _sync(device)
        t1 = time.perf_counter()
        txt = text_side(text)
        _sync(device)
        t_img += t1 - t0
        t_txt += time.perf_counter() - t1
        parts["img"].append(img.float().cpu())
        parts["txt"].append(txt.float().cpu())
        for key in ("image_ids", "labels", "text_ids", "text_image_ids"):
            parts[key].append(batch[key].cpu())
        bar.update(len(batch["image_ids"]))
    bar.close()
    if not parts["img"]:
        raise RunError(f"{run.path}: split '{split}' yielded no records")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    # id order, first copy of each id: what RetrievalMetrics.compute does with the same batches
    img_order = _first_by_id(cat["image_ids"])
    txt_order = _first_by_id(cat["text_ids"])
    img_ids = cat["image_ids"][img_order]
    txt_img = cat["text_image_ids"][txt_order]
    caption_image = torch.searchsorted(img_ids, txt_img)
    if bool((caption_image >= len(img_ids)).any()) or bool((img_ids[caption_image.clamp_max(len(img_ids) - 1)]
                                                              != txt_img).any()):
        raise RunError(f"{run.path}: captions of split '{split}' refer to images that were not read")
    image, text = cat["img"][img_order], cat["txt"][txt_order]
    if run.family == "hash":
        image_gallery, text_gallery = pack_codes(binarize(image)), pack_codes(binarize(text))
    else:
        image_gallery, text_gallery = image, text
    n, m = len(img_order), len(txt_order)
    timing = {"device": str(device), "batch_size": bs, "threads": torch.get_num_threads(),
              "image_seconds": t_img, "text_seconds": t_txt, "images": n, "texts": m,
              "captions_per_batch": m / max(1, len(parts["img"]))}
    return EncodedSplit(image.numpy(), text.numpy(), image_gallery.numpy(), text_gallery.numpy(),
                        caption_image.numpy(), (cat["labels"][img_order] != 0).numpy().astype(np.uint8),
                        img_ids.numpy(), cat["text_ids"][txt_order].numpy(), timing)


def _first_by_id(ids: torch.Tensor) -> torch.Tensor:
    uids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    pos = torch.arange(ids.numel())
    return torch.full_like(uids, ids.numel()).scatter_reduce_(0, inverse, pos, "amin")
