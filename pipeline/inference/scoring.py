"""An encoded split scored the way its run scores it, with the protocol's metrics:

    metrics = split_metrics(run, enc, ks=(1, 5, 10))

Embedding and hashing runs: `evaluate` on the gallery features with the run's measure. Token-level runs:
`evaluate_tokens` with the run's token scorer, exhaustively or through the screen (the global embeddings'
top K re-ranked), as its test split was scored (runs/<name>/test_scoring.json; `mode` / `k` override).
"""
from __future__ import annotations

import torch

from pipeline.evaluation.protocol import evaluate
from pipeline.evaluation.token_level import evaluate_tokens
from pipeline.inference.encoding import EncodedSplit
from pipeline.inference.runs import Run


def split_metrics(run: Run, enc: EncodedSplit, ks=(1, 5, 10), mode: str | None = None, k: int | None = None,
                  device="cpu") -> dict[str, float]:
    if not enc.has_tokens:
        return evaluate(enc.image_gallery, enc.text_gallery, enc.caption_image, enc.labels, measure=run.measure,
                        ks=ks)
    scoring = run.test_scoring
    mode = mode or scoring["mode"]
    k = k or scoring.get("screen_k") or run.cfg.tokens.screen_k
    scorer = run.module.token_scorer.to(device)
    grid, pairs = scorer.functions()

    def on(x):
        return torch.as_tensor(x).to(device)

    return evaluate_tokens(on(enc.image_tokens), on(enc.image_mask), on(enc.text_tokens), on(enc.text_mask),
                           on(enc.caption_image), grid, pairs, image_labels=on(enc.labels), mode=mode, k=k,
                           screen_image=on(enc.image_gallery), screen_text=on(enc.text_gallery), ks=ks,
                           score_candidates=scorer.candidates_function())
