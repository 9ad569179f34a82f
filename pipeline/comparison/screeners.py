"""Screeners for hybrid retrieval: a trained hashing run (every family; a nested run also by its prefixes
and a cascade), and two made from a fine-grained model's embeddings: a distilled hash head (trained on the
frozen embeddings with the instance-level hashing objective: contrast + distillation + quantisation) and
SimHash (random hyperplanes, no training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cli import progress_bar
from pipeline.comparison.cascade import nested_screens
from pipeline.evaluation.scores import as_tensor, pack_codes
from pipeline.inference.encoding import encode_split
from pipeline.models.heads import HashHead, binarize
from pipeline.objectives.instance import instance_loss


class DistilledHasher(nn.Module):
    """Hash heads (MLP + tanh, one per modality) on frozen fine-grained embeddings."""

    def __init__(self, dim: int, bits: int, hidden: int = 512):
        super().__init__()
        self.dim, self.bits, self.hidden = dim, bits, hidden
        self.image_head = HashHead(dim, hidden, bits)
        self.text_head = HashHead(dim, hidden, bits)
        self.name = f"distilled-{bits}"

    def forward(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return (self.image_head if side == "image" else self.text_head)(x)

    @torch.no_grad()
    def codes(self, feats, side: str, block: int = 1 << 16) -> np.ndarray:
        """Packed uint8 codes of embeddings ``[n, dim]`` (``side``: image | text)."""
        x = as_tensor(feats).float()
        out = [pack_codes(binarize(self(x[a:a + block], side))) for a in range(0, x.shape[0], block)]
        return torch.cat(out).numpy()

    def save(self, path) -> None:
        torch.save({"dim": self.dim, "bits": self.bits, "hidden": self.hidden, "state_dict": self.state_dict()},
                   path)

    @classmethod
    def load(cls, path) -> "DistilledHasher":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(blob["dim"], blob["bits"], blob["hidden"])
        model.load_state_dict(blob["state_dict"])
        return model.eval()


def distill(image_feats, text_feats, caption_image, bits: int = 64, steps: int = 2000, batch_size: int = 512,
            lr: float = 5e-3, teacher_scale: float = 20.0, code_scale: float = 12.0, distill_weight: float = 1.0,
            quant_weight: float = 0.1, hidden: int = 512, seed: int = 0, progress: bool = False) -> DistilledHasher:
    """Train a :class:`DistilledHasher` on frozen fine-grained embeddings (training split).

    Loss per batch of ``batch_size`` (image, random own caption) pairs, on the codes'
    normalised tanh relaxations h (cosine of codes = 1 - 2 * Hamming / bits):
      * instance-level symmetric InfoNCE at scale ``code_scale`` (same-image columns masked);
      * distillation: KL(softmax(teacher_scale * fine-grained cosines) || softmax(code_scale *
        code cosines)) over the batch, both directions: codes learn the teacher's ranking,
        not just its top-1;
      * quantisation: mean (|h| - 1)^2, so that sign() changes little.
    Runs on one CPU thread: the matrices are small, and a thread team's synchronisation costs
    more than it saves (10x slower with two threads on a loaded 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _distill(image_feats, text_feats, caption_image, bits, steps, batch_size, lr, teacher_scale,
                        code_scale, distill_weight, quant_weight, hidden, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _distill(image_feats, text_feats, caption_image, bits, steps, batch_size, lr, teacher_scale, code_scale,
             distill_weight, quant_weight, hidden, seed, progress) -> DistilledHasher:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    img = F.normalize(as_tensor(image_feats).float(), dim=1)
    txt = F.normalize(as_tensor(text_feats).float(), dim=1)
    cap = as_tensor(caption_image).to(torch.int64)
    model = DistilledHasher(img.shape[1], bits, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = progress_bar(steps, f"distill {bits}-bit", progress, "step")
    batch_size = min(batch_size, txt.shape[0])
    model.train()
    for _ in range(steps):
        c = torch.randint(txt.shape[0], (batch_size,), generator=gen)
        ids = cap[c]
        fi, ft = img[ids], txt[c]
        hi, ht = model(fi, "image"), model(ft, "text")
        # the instance-level hashing objective (hash.objective=instance), the embeddings as the teacher
        loss, _ = instance_loss(hi, ht, ids, code_scale, quant_weight, (fi, ft), distill_weight, teacher_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
    bar.close()
    return model.eval()


class SimHash:
    """Sign of random hyperplane projections (Charikar): Hamming distance estimates the angle."""

    def __init__(self, dim: int, bits: int, seed: int = 0):
        self.bits, self.name = bits, f"simhash-{bits}"
        self.planes = torch.randn(dim, bits, generator=torch.Generator().manual_seed(seed))

    def codes(self, feats, side: str = "image", block: int = 1 << 16) -> np.ndarray:
        x = as_tensor(feats).float()
        blocks = range(0, x.shape[0], block)
        return torch.cat([pack_codes(x[a:a + block] @ self.planes, zero_one=False) for a in blocks]).numpy()


def fine_grained_screeners(fg_run, fg_test, distill_bits, simhash_bits, steps: int, device="cpu",
                           cache_dir: Path | None = None, progress: bool = False, seed: int = 0) -> dict:
    """Distilled (trained on the run's training split embeddings, cached) and SimHash screeners."""
    screeners = {}
    distill_bits = [b for b in distill_bits if b]
    if distill_bits:
        train = None
        for bits in distill_bits:
            path = None if cache_dir is None else cache_dir / f"distilled-{fg_run.name}-{bits}bit-{steps}steps.pt"
            if path is not None and path.is_file() and path.stat().st_mtime >= fg_run.checkpoint.stat().st_mtime:
                model = DistilledHasher.load(path)
            else:
                if train is None:
                    train = encode_split(fg_run, "train", device=device, progress=progress)
                model = distill(train.image, train.text, train.caption_image, bits=bits, steps=steps, seed=seed,
                                progress=progress)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    model.save(path)
            screeners[model.name] = model
    for bits in [b for b in simhash_bits if b]:
        s = SimHash(fg_test.image.shape[1], bits, seed)
        screeners[s.name] = s
    return screeners


def run_screeners(name: str, split, prefixes=()) -> dict:
    """A trained hashing run as screeners: its codes (`split`, its encoded test split) and, for nested codes,
    each prefix alone and the two-level cascade (`cascade.nested_screens`)."""
    return {name: split, **nested_screens(name, prefixes)}
