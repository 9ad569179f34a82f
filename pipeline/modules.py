"""Lightning modules: encoders and heads are injected; the module owns the step, the objective,
the optimiser and the evaluation protocol (PROTOCOL.md)."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads import EmbeddingHead, HashHead, binarize
from pipeline.metrics import RetrievalMetrics
from pipeline.objectives import (MemoryBankContrast, check_finite, cross_modal_ranking, info_nce, label_similarity,
                                 vse_max_violation)
from pipeline.retrieval import pack_codes


class RetrievalModule(L.LightningModule):
    """Shared by both families: training step, evaluation on val/test, optimiser and schedule.

    Subclasses define the heads (`image_head`, `text_head`), `objective` and `gallery_features`."""

    measure = "cosine"
    ks: tuple[int, ...] = (1, 5, 10)

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict):
        super().__init__()
        self.image_encoder, self.text_encoder, self.optim = image_encoder, text_encoder, optim
        self.val_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks)
        self.test_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks)
        self.test_results: dict[str, float] = {}

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.image_head(self.image_encoder(batch["images"]).vector)
        txt = self.text_head(self.text_encoder(**batch["text"]).vector)
        return img, txt

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        img, txt = self.embed(batch)
        loss, parts = self.objective(img, txt, batch)
        check_finite(loss, self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def _eval_step(self, batch: dict, metrics: RetrievalMetrics) -> None:
        img, txt = self.embed(batch)
        metrics.update(self.gallery_features(img), batch["image_ids"], batch["labels"],
                       self.gallery_features(txt), batch["text_ids"], batch["text_image_ids"])

    def _eval_end(self, metrics: RetrievalMetrics, stage: str) -> dict[str, float]:
        results = {k: float(v) for k, v in metrics.compute().items()}
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in results.items()}, sync_dist=True)
        return results

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_end(self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._eval_end(self.test_metrics, "test")

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]  # norms, biases, scales
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.optim["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.optim["lr"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.optim["warmup_steps"], total // 2)
        cosine = self.optim["schedule"] == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FineGrainedAligner(RetrievalModule):
    """Continuous embeddings; symmetric InfoNCE with a learnable, clamped temperature, or VSE++."""

    measure = "cosine"

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, embed_dim: int,
                 head_hidden: int, loss: str = "infonce", init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, margin: float = 0.2):
        super().__init__(image_encoder, text_encoder, optim)
        self.image_head = EmbeddingHead(image_encoder.out_dim, head_hidden, embed_dim)
        self.text_head = EmbeddingHead(text_encoder.out_dim, head_hidden, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.loss_name, self.max_log_scale, self.margin = loss, math.log(max_logit_scale), margin

    def objective(self, img, txt, batch):
        if self.loss_name == "vse_max_violation":
            return vse_max_violation(img, txt, self.margin, batch["image_ids"]), {}
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        return info_nce(img, txt, scale, batch["image_ids"]), {"logit_scale": scale.detach()}

    def gallery_features(self, z: torch.Tensor) -> torch.Tensor:
        return z


class CrossModalHasher(RetrievalModule):
    """UCCH: tanh hash heads; contrastive loss against a memory bank's sign keys + cross-modal
    ranking loss. Codes are sign() at test time, stored packed (bits/8 bytes per item)."""

    measure = "hamming"
    ks = (1, 5, 10, 50, 100, 200)

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict, bits: int,
                 head_hidden: int, num_train_items: int, alpha: float = 0.7, tau: float = 0.9,
                 momentum: float = 0.4, num_negatives: int = 4096, margin: float = 0.2, shift: float = 0.1,
                 warmup_epochs: int = 1, label_weight: float = 0.0, label_scale: float = 5.0, seed: int = 0):
        super().__init__(image_encoder, text_encoder, optim)
        self.image_head = HashHead(image_encoder.out_dim, head_hidden, bits)
        self.text_head = HashHead(text_encoder.out_dim, head_hidden, bits)
        self.bank = MemoryBankContrast(num_train_items, bits, tau, momentum, num_negatives, seed)
        self.alpha, self.margin, self.shift, self.warmup_epochs = alpha, margin, shift, warmup_epochs
        self.label_weight, self.label_scale = label_weight, label_scale

    def objective(self, hx, hy, batch):
        idx, warmup = batch["image_ids"], self.current_epoch < self.warmup_epochs
        if int(idx.max()) >= len(self.bank.bank):
            raise IndexError(f"training image index {int(idx.max())} >= {len(self.bank.bank)} images in the card")
        contrast = (self.bank.loss(hx, idx, self.global_step, warmup, hy)
                    + self.bank.loss(hy, idx, self.global_step, warmup, hx))
        ranking = cross_modal_ranking(F.normalize(hx, dim=1), F.normalize(hy, dim=1), self.margin, self.shift)
        self.bank.update(hx.detach(), hy.detach(), idx, warmup)
        loss = self.alpha * contrast + (1 - self.alpha) * ranking
        parts = {"contrast": contrast.detach(), "ranking": ranking.detach()}
        if self.label_weight > 0:
            supervised = label_similarity(hx, hy, batch["labels"], self.label_scale)
            loss = loss + self.label_weight * supervised
            parts["label"] = supervised.detach()
        return loss, parts

    def gallery_features(self, h: torch.Tensor) -> torch.Tensor:
        return pack_codes(binarize(h))


def module_class(cfg) -> type[RetrievalModule]:
    """The LightningModule class of the config's model family (its class attributes say what it logs)."""
    return FineGrainedAligner if cfg.model.kind == "fine_grained" else CrossModalHasher


def build_module(cfg, num_train_items: int, vocab_size: int, pad_token_id: int = 0,
                 load_init: bool = True) -> RetrievalModule:
    """The config's module. `load_init=False` skips `model.image_encoder.init` (and pretraining the
    shapes backbone): for a module whose weights come from a checkpoint next."""
    from pipeline.backbone import resolve_init
    from pipeline.encoders import build_image_encoder, build_text_encoder

    image_encoder = build_image_encoder(cfg.model.image_encoder, resolve_init(cfg) if load_init else None)
    text_encoder = build_text_encoder(cfg.model.text_encoder, vocab_size, cfg.data.max_text_len, pad_token_id)
    optim = {k: cfg.optim[k] for k in ("lr", "weight_decay", "warmup_steps", "schedule")}
    if cfg.model.kind == "fine_grained":
        a = cfg.align
        return FineGrainedAligner(image_encoder, text_encoder, optim, cfg.model.embed_dim, cfg.model.head_hidden,
                                  a.loss, a.init_temperature, a.max_logit_scale, a.margin)
    h = cfg.hash
    return CrossModalHasher(image_encoder, text_encoder, optim, cfg.model.bits, cfg.model.head_hidden,
                            num_train_items, h.alpha, h.tau, h.momentum, h.num_negatives, h.margin, h.shift,
                            h.warmup_epochs, h.label_weight, h.label_scale, cfg.run.seed)
