"""The shapes analogue of ImageNet weights: a SmallCNN pretrained to name the shape in
single-object images, made on first use and cached (`model.image_encoder.init: shapes`).

Why: hashing models learn their codes on top of a pretrained image backbone (UCCH on VGG-19
features; every hashing model in FiCo-ITR). From raw pixels they lose much of their
category-level mAP (UCCH's issue #14: 0.56 against 0.76). On the shapes data it is starker: trained
from scratch, the contrastive objectives learn colour, size and position, which already tell the
instances apart, and never the shapes, so category mAP stays at chance (0.38-0.42 here, whatever
the temperature, loss or data variant we tried) although a plain classifier learns the shapes in a
few hundred steps. The pretraining images are the dataset's own kind of object, one per image, from
their own seed namespace: disjoint from the retrieval splits, as ImageNet is from MS-COCO.

    python -m pipeline.backbone --config hash_64bit.yaml   (train.py does it on first use; before a
                                                           multi-rank job it saves each rank the work)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_prep import SHAPES, atomic_open, single_object_images
from pipeline.config import ConfigError, load_config
from pipeline.data import image_transform
from pipeline.models.encoders import SmallCNN, image_statistics

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the recipe below changes what a given made_with produces
BATCH = 128
MAX_IMAGES = 6000  # 500 steps x 128 = ~11 passes: enough for ~99% held-out accuracy at width 64
LR, WEIGHT_DECAY = 1e-3, 1e-4


def _images(count: int, image_size: int, mean, std, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # not a retrieval split's namespace: disjoint images
    pictures, shapes = single_object_images(count, image_size, f"shapes-backbone/{seed}")
    transform = image_transform(image_size, mean, std)
    return torch.stack([transform(p) for p in pictures]), torch.tensor(shapes)


def pretrain(width: int, image_size: int, mean, std, steps: int, seed: int = 0) -> tuple[dict, float]:
    """SmallCNN(width) trained `steps` steps to classify the shape; returns its state_dict and the
    accuracy on held-out images. Leaves the global RNG state as it found it (a cached backbone and a
    fresh one must give a run the same initialisation of everything else)."""
    count = min(MAX_IMAGES, BATCH * steps)
    holdout = max(1, count // 12)
    images, labels = _images(count + holdout, image_size, mean, std, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, classify = SmallCNN(width), nn.Linear(width, len(SHAPES))
        params = list(net.parameters()) + list(classify.parameters())
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        for _ in range(steps):
            idx = torch.randint(0, count, (BATCH,))
            loss = F.cross_entropy(classify(net(images[idx]).vector), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (classify(net(images[count:]).vector).argmax(1) == labels[count:]).float().mean().item()
    return net.state_dict(), accuracy


def shapes_backbone(width: int, image_size: int, mean, std, steps: int, cache_dir, seed: int = 0) -> Path:
    """Path of the cached backbone for this recipe, pretrained now if it is not there yet.

    Every recipe has its own file (the name carries a hash of it), so changing a setting never
    loads stale weights. Several processes (DDP ranks) may pretrain at once: each writes
    atomically (data_prep.atomic_open); DDP starts every rank from rank 0's weights anyway."""
    made_with = {"width": width, "image_size": image_size, "mean": list(mean), "std": list(std), "steps": steps,
                 "seed": seed, "recipe": RECIPE_VERSION}
    tag = hashlib.sha1(json.dumps(made_with, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(cache_dir).expanduser() / f"shapes_cnn{width}_{image_size}px_{steps}steps_{tag}.pt"
    if path.is_file():
        return path
    log.warning("pretraining the shapes image backbone (%d steps, once) -> %s", steps, path)
    state, accuracy = pretrain(width, image_size, mean, std, steps, seed)
    log.warning("shapes backbone: %.1f%% of held-out shapes named", 100 * accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"state_dict": state, "made_with": made_with, "holdout_accuracy": accuracy}, f)
    return path


def resolve_init(cfg) -> Path | str | None:
    """The weights file `model.image_encoder.init` names (`shapes`: the cached backbone above)."""
    enc = cfg.model.image_encoder
    if enc.name != "cnn":  # open_clip: a pretrained tag or a file, which open_clip resolves
        return enc.init
    if enc.init != "shapes":
        return Path(enc.init).expanduser() if enc.init else None
    own_mean, own_std = image_statistics(enc)  # data.mean / std when the config leaves them to the encoder
    mean = own_mean if cfg.data.mean is None else cfg.data.mean
    std = own_std if cfg.data.std is None else cfg.data.std
    return shapes_backbone(enc.width, cfg.data.image_size, mean, std, enc.init_steps,
                           Path(cfg.data.shapes_dir).expanduser().parent / "backbones", cfg.run.seed)


def main(argv=None) -> int:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="an experiment whose model.image_encoder.init is shapes")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train.py")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    if cfg.model.image_encoder.init != "shapes":
        raise SystemExit(f"error: {args.config} does not start from the shapes backbone "
                         f"(model.image_encoder.init={cfg.model.image_encoder.init}); nothing to pretrain")
    print(resolve_init(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
