"""The LightningModule both families share: encoders and heads are injected; it owns the training step,
evaluation by the protocol on val/test, and the optimiser with its schedule. A subclass says what its
heads are (`image_head`, `text_head`), its `objective` and its `gallery_features` (what retrieval
compares: embeddings, or packed codes). Token-level families also return token sets
(`encode_*_with_tokens`) and carry the `token_scorer` that compares them."""
from __future__ import annotations

import math
from contextlib import nullcontext

import lightning as L
import torch
from torch import nn

from pipeline.evaluation.metric import RetrievalMetrics
from pipeline.training.grad_cache import cached_backward


class RetrievalModule(L.LightningModule):
    """Shared by both families: training step, evaluation on val/test, optimiser and schedule.

    Subclasses define the heads (`image_head`, `text_head`), `objective` and `gallery_features`. Every tool
    that uses a trained model (encoding, report, hybrid, search, export) goes through `encode_images` /
    `encode_texts`, `gallery_features` and `measure`, so a new family plugs in by defining them; state
    that only training needs is named in `training_only_state`. A token-level family also defines
    `encode_images_with_tokens` / `encode_texts_with_tokens` (the same output and the token set, from one
    forward pass) and sets `token_scorer` (`token_scorer(images, texts)` scores token sets) and
    `test_scoring` (how its test split is scored, written to the run folder); for the other families they
    are None. A model with nested codes lists their lengths in `prefixes`; `gallery_features(x, bits=L)`
    then gives the first L bits' packed codes.

    Training splits the step in two: `represent(batch)` (the forward pass: what the objective reads) and
    `training_loss(reps, batch)`; a family whose objective reads more than the two embeddings (token sets)
    overrides both. The split is what lets `optim.accum_steps` cache the representations (grad_cache.py)."""

    measure = "cosine"
    ks: tuple[int, ...] = (1, 5, 10)
    monitor = "val/rsum"  # the validation metric that picks best.ckpt unless run.monitor says otherwise
    prefixes: tuple[int, ...] = ()  # nested codes: leading bit counts usable alone, gallery_features(x, bits=L)
    # state-dict prefixes only training needs (UCCH's memory bank, sized by the training set): left out
    # of exports and never required to load a trained module for inference
    training_only_state: tuple[str, ...] = ()
    compile_encoders = False  # trainer.compile: torch.compile the encoders when fitting starts (on_fit_start)

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, optim: dict):
        super().__init__()
        self.image_encoder, self.text_encoder, self.optim = image_encoder, text_encoder, optim
        # optim.accum_steps > 1: each training batch is that many chunks, one optimizer step (grad_cache.py)
        self.accum_steps = optim.get("accum_steps", 1)
        self.automatic_optimization = self.accum_steps == 1
        self.val_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks)
        self.test_metrics = RetrievalMetrics(measure=self.measure, ks=self.ks)
        self.test_results: dict[str, float] = {}
        self.token_scorer: nn.Module | None = None
        self.test_scoring: dict | None = None

    def encode_images(self, images: torch.Tensor | dict) -> torch.Tensor:
        """The continuous output of the image side (embeddings, or relaxed codes before sign). `images` is a
        batch's `images`: pixels, feature vectors, or (token feature shards) the encoder's keyword inputs."""
        return self.image_head(encode(self.image_encoder, images).vector)

    def encode_texts(self, text: dict) -> torch.Tensor:
        """The same for captions; `text` is the text encoder's keyword inputs (a batch's `text`)."""
        return self.text_head(self.text_encoder(**text).vector)

    def is_training_only(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.training_only_state)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that encoding and retrieval use: the state dict without `training_only_state`."""
        return {k: v for k, v in self.state_dict().items() if not self.is_training_only(k)}

    def load_inference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads `state` (a checkpoint's state dict, or an export's weights) strictly, except for
        `training_only_state`, which may be absent or of another size (another training set)."""
        missing, unexpected = self.load_state_dict({k: v for k, v in state.items() if not self.is_training_only(k)},
                                                   strict=False)
        missing = [k for k in missing if not self.is_training_only(k)]
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def encode_images_with_tokens(self, images: torch.Tensor):
        """(encode_images' output, the images' token set or None): one forward pass for both."""
        return self.encode_images(images), None

    def encode_texts_with_tokens(self, text: dict):
        """(encode_texts' output, the captions' token set or None)."""
        return self.encode_texts(text), None

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_images(batch["images"]), self.encode_texts(batch["text"])

    def represent(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """What the training objective reads of a batch's inputs (`images`, `text`), from one forward pass."""
        return self.embed(batch)

    def training_loss(self, reps: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, parts to log) of `represent`'s output for the whole batch."""
        return self.objective(*reps, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            loss, parts = self.training_loss(self.represent(batch), batch)
            check_finite(loss, self.global_step)
        else:
            loss, parts = self.accumulated_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        return loss

    def accumulated_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """One optimizer step over the batch's `accum_steps` chunks, negatives from all of them (GradCache);
        clipping and the schedule once per optimizer step, as in automatic optimization."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)  # DDP: all-reduce once
        loss, parts = cached_backward(self, self.represent, self.training_loss, batch, self.accum_steps,
                                      self.manual_backward, no_sync)
        check_finite(loss, self.global_step)
        opt.step()  # clips first: on_before_optimizer_step
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss, parts

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
        self.test_metrics.curves = True  # the run's test_curves.json (P@K, PR11, radius PR; needs labels)
        self.test_results = self._eval_end(self.test_metrics, "test")
        self.test_curves = self.test_metrics.last_curves

    def on_before_optimizer_step(self, optimizer) -> None:
        """optim.grad_clip under optim.accum_steps (Lightning clips only in automatic optimization): here the
        gradients are final and, under 16-bit AMP, already unscaled."""
        if not self.automatic_optimization and self.optim.get("grad_clip"):
            self.clip_gradients(optimizer, gradient_clip_val=self.optim["grad_clip"], gradient_clip_algorithm="norm")

    def on_fit_start(self) -> None:
        """`trainer.compile`: the encoders' forward compiled in place (nn.Module.compile: the state dict's
        keys stay as they are, so checkpoints load either way); the heads and losses stay eager."""
        if self.compile_encoders:
            if self.accum_steps > 1:  # the cached step replays dropout from the saved RNG state: compiled
                import torch._inductor.config as inductor  # random ops must draw from that generator too

                inductor.fallback_random = True
            self.image_encoder.compile()
            self.text_encoder.compile()

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


def encode(encoder: nn.Module, inputs):
    """An encoder on a batch's inputs: a tensor, or a dict of keyword inputs."""
    return encoder(**inputs) if isinstance(inputs, dict) else encoder(inputs)


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step}: stopping. Lower optim.lr, check the data, or resume "
            f"from the last checkpoint with a different seed.")
