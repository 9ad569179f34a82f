"""Token-level scorers: how well a caption matches an image, from their token sets (image regions or
patches, word pieces), rather than from one vector per item.

Both scorers start from the same similarities `S[r, w] = <region r, word w>` of L2-normalised tokens
and differ in what they make of them:

* `LateInteraction` (FILIP, ColBERT): every word takes its best-matching region and the score is the
  mean over valid words (text-to-image); every region takes its best-matching word, mean over valid
  regions (image-to-text). Each side's tokens are computed alone, so a gallery's token sets can be
  precomputed and stored.
* `CrossAttention` (SCAN, Lee et al. 2018): every word attends over the regions (softmax of
  `attention_scale` times SCAN's normalised similarity: LeakyReLU(0.1), then L2 over the words), its
  relevance is the cosine between the word and its attended region vector, and the relevances are
  pooled by LogSumExp (`pooling_scale`) or averaged; image-to-text is the same with the roles swapped.

`direction` picks the score: `t2i`, `i2t`, or `both` (their mean, SCAN's t-i + i-t ensemble within one
model). One score per (image, caption) pair serves both retrieval directions.

Memory is bounded by the block: a block of images x captions is scored at a time with at most
`block_elements` entries of S (cross-attention keeps about six tensors of that size alive). Padding
(mask False) never changes a score. The same code runs on CPU and GPU. Under autograd (training)
every block's intermediates are kept for the backward pass, so training memory grows as
B x B' x R x W (B local rows, B' gathered columns, R regions, W words), unless `checkpointed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DIRECTIONS = ("both", "t2i", "i2t")
POOLINGS = ("lse", "avg")


@dataclass
class TokenSet:
    """Token features of N items: `tokens [N, T, D]`, `mask [N, T]` True where a token is real (every item has
    at least one; what padding slots hold does not matter: the scorers zero them)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, rows) -> "TokenSet":
        return TokenSet(self.tokens[rows], self.mask[rows])

    def to(self, device) -> "TokenSet":
        return TokenSet(self.tokens.to(device), self.mask.to(device))

    def padded(self, length: int) -> "TokenSet":
        """The same set with `length` token slots (padding appended, masked)."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.tokens.shape[1]} tokens down to {length}")
        if extra == 0:
            return self
        return TokenSet(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False))

    @staticmethod
    def cat(sets: list["TokenSet"]) -> "TokenSet":
        """Sets of different token lengths, padded to the longest and stacked."""
        length = max(s.tokens.shape[1] for s in sets)
        padded = [s.padded(length) for s in sets]
        return TokenSet(torch.cat([s.tokens for s in padded]), torch.cat([s.mask for s in padded]))

    def zeroed(self) -> "TokenSet":
        """The same set with every padding slot zero (so that similarities with padding are exactly 0)."""
        return TokenSet(self.tokens * self.mask[..., None].to(self.tokens.dtype), self.mask)

    def trimmed(self) -> "TokenSet":
        """Without the token slots that are padding in every row (shorter blocks score faster)."""
        used = int(self.mask.any(0).nonzero().max()) + 1 if self.mask.any() else 1
        return self if used == self.tokens.shape[1] else TokenSet(self.tokens[:, :used], self.mask[:, :used])


@dataclass
class Block:
    """The similarities of a block of (image, caption) pairs and how to read them.

    Grid blocks (every image against every caption) hold `s [a, R, b, W]`, the layout of one matmul of
    the image tokens with the caption tokens, so that products with the per-item Gram matrices are a
    few large batched matmuls; pair blocks (image p with caption p) hold `s [P, R, W]`. `r` and `w` are
    the region and word dimensions of `s`; the masks broadcast against `s` (padding False)."""

    s: torch.Tensor
    r: int
    w: int
    region_mask: torch.Tensor
    word_mask: torch.Tensor
    images: torch.Tensor | None  # the block's image tokens [a or P, R, D] (padding zero), or None with image_gram
    texts: torch.Tensor | None  # its caption tokens [b or P, W, D], or None with text_gram
    image_gram: torch.Tensor | None = None  # V V^T per image [a or P, R, R] when already known (a query's, shared)
    text_gram: torch.Tensor | None = None  # E E^T per caption [b or P, W, W]

    @property
    def grid(self) -> bool:
        return self.s.ndim == 4

    def regions_gram(self, x: torch.Tensor) -> torch.Tensor:
        """`G_v x` along the region dimension (G_v = V V^T of each pair's image)."""
        gram = self.image_gram if self.image_gram is not None else self.images @ self.images.transpose(1, 2)
        return torch.einsum("ars,asbw->arbw", gram, x) if self.grid else gram @ x

    def words_gram(self, x: torch.Tensor) -> torch.Tensor:
        """`x G_e` along the word dimension (G_e = E E^T of each pair's caption)."""
        gram = self.text_gram if self.text_gram is not None else self.texts @ self.texts.transpose(1, 2)
        return torch.einsum("arbw,bwv->arbv", x, gram) if self.grid else x @ gram


class TokenScorer(nn.Module):
    """Scores images against captions from their token sets; subclasses define `_scores` on a Block."""

    uses_gram = False  # whether `_scores` reads the Block's Gram products

    def __init__(self, direction: str = "both", block_elements: int = 1 << 20):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction, self.block_elements = direction, int(block_elements)
        # under autograd, recompute each block's intermediates in the backward pass instead of keeping them:
        # training memory B x B' (the scores) instead of B x B' x R x W, for ~1.3x the scoring time (set by
        # the module for large batches: optim.accum_steps > 1)
        self.checkpointed = False

    @property
    def name(self) -> str:
        """What the scorer is, as tables and model cards print it, e.g. `LateInteraction (both)`."""
        return f"{type(self).__name__} ({self.direction})"

    def forward(self, images: TokenSet, texts: TokenSet) -> torch.Tensor:
        """Scores `[len(images), len(texts)]` of every image against every caption, block by block. With
        more captions than one block holds, captions of similar length share a block (cut to their own
        longest): padding costs as much as words."""
        images, texts = images.trimmed().zeroed(), texts.zeroed()
        r, w = images.tokens.shape[1], texts.tokens.shape[1]
        cols = max(1, min(len(texts), self.block_elements // (r * w)))
        rows = max(1, min(len(images), self.block_elements // (r * w * cols)))
        order = None if cols == len(texts) else torch.argsort(texts.mask.sum(1), stable=True)
        column_blocks = [texts[order[b:b + cols]] if order is not None else texts for b in range(0, len(texts), cols)]
        column_blocks = [block.trimmed() for block in column_blocks]
        recompute = self.checkpointed and torch.is_grad_enabled()  # keep each block's scores only

        def grid_block(v, vm, texts):
            return checkpoint(self._grid_block, v, vm, texts, use_reentrant=False) if recompute else \
                self._grid_block(v, vm, texts)

        out = torch.cat([torch.cat([grid_block(images.tokens[a:a + rows], images.mask[a:a + rows], block)
                                    for block in column_blocks], dim=1) for a in range(0, len(images), rows)])
        return out if order is None else out[:, torch.argsort(order)]

    def _grid_block(self, v: torch.Tensor, vm: torch.Tensor, texts: TokenSet) -> torch.Tensor:
        (a, r, d), (b, w, _) = v.shape, texts.tokens.shape
        s = (v.reshape(-1, d) @ texts.tokens.reshape(-1, d).T).view(a, r, b, w)
        return self._scores(Block(s, 1, 3, vm[:, :, None, None], texts.mask[None, None], v, texts.tokens))

    def pairs(self, images: TokenSet, texts: TokenSet) -> torch.Tensor:
        """Scores `[P]` of image p with caption p (the re-ranking of candidates), block by block."""
        if len(images) != len(texts):
            raise ValueError(f"pairs needs as many images as captions, got {len(images)} and {len(texts)}")
        images, texts = images.trimmed().zeroed(), texts.trimmed().zeroed()
        step = max(1, self.block_elements // (images.tokens.shape[1] * texts.tokens.shape[1]))
        out = []
        for a in range(0, len(images), step):
            v, vm = images.tokens[a:a + step], images.mask[a:a + step]
            e, em = texts.tokens[a:a + step], texts.mask[a:a + step]
            out.append(self._scores(Block(v @ e.transpose(1, 2), 1, 2, vm[:, :, None], em[:, None, :], v, e)))
        return torch.cat(out) if out else images.tokens.new_zeros(0)

    def candidates(self, queries: TokenSet, gallery: TokenSet, candidates: torch.Tensor,
                   queries_are_images: bool) -> torch.Tensor:
        """Scores `[q, K]` of query i with gallery items `candidates[i]` (the re-ranking of a screen's top K),
        as `pairs` gives them, without repeating each query K times: one batched matmul per chunk of queries
        (the query's tokens against its K candidates' tokens) and the query's Gram matrix computed once.
        About 5x faster than `pairs` on gathered rows here (docs/benchmarks.md)."""
        if len(queries) != len(candidates):
            raise ValueError(f"one row of candidates per query: {len(queries)} queries, {len(candidates)} rows")
        depth = candidates.shape[1]
        out = []
        gallery = gallery.trimmed().zeroed()  # once: the chunks gather contiguous rows of it
        length_q, length_g = queries.trimmed().tokens.shape[1], gallery.tokens.shape[1]
        step = max(1, self.block_elements // max(1, depth * length_q * length_g))
        for a in range(0, len(queries), step):
            q = queries[a:a + step].trimmed().zeroed()
            out.append(self._candidate_block(q, gallery[candidates[a:a + step].reshape(-1)], depth, queries_are_images))
        return torch.cat(out) if out else queries.tokens.new_zeros(0, depth)

    def _candidate_block(self, q: TokenSet, g: TokenSet, depth: int, queries_are_images: bool) -> torch.Tensor:
        """A chunk of `candidates`: `q` the chunk's n queries, `g` their candidates' rows (n x depth, query-major)."""
        n, t, d = q.tokens.shape
        items = g.tokens.view(n, depth * g.tokens.shape[1], d)
        pairs = n * depth
        shared = None
        if self.uses_gram:  # once per query, shared by its candidates
            gram = q.tokens @ q.tokens.transpose(1, 2)
            shared = gram[:, None].expand(n, depth, t, t).reshape(pairs, t, t)
        query_mask = q.mask[:, None].expand(n, depth, t).reshape(pairs, t)
        if queries_are_images:  # [n, R, K*W] -> pairs [P, R, W]
            w = g.tokens.shape[1]
            s = (q.tokens @ items.transpose(1, 2)).view(n, t, depth, w).transpose(1, 2).reshape(pairs, t, w)
            block = Block(s, 1, 2, query_mask[:, :, None], g.mask[:, None, :], None, g.tokens, image_gram=shared)
        else:  # captions: [n, K*R, W] -> pairs [P, R, W]
            r = g.tokens.shape[1]
            s = (items @ q.tokens.transpose(1, 2)).view(pairs, r, t)
            block = Block(s, 1, 2, g.mask[:, :, None], query_mask[:, None, :], g.tokens, None, text_gram=shared)
        return self._scores(block).view(n, depth)

    def functions(self):
        """(grid, pairs): this scorer as plain functions of tensors `(img_tokens, img_mask, txt_tokens,
        txt_mask)`, the form the objectives and the evaluation room take (they know no models)."""
        def grid(img_tokens, img_mask, txt_tokens, txt_mask):
            return self(TokenSet(img_tokens, img_mask), TokenSet(txt_tokens, txt_mask))

        def pairs(img_tokens, img_mask, txt_tokens, txt_mask):
            return self.pairs(TokenSet(img_tokens, img_mask), TokenSet(txt_tokens, txt_mask))

        return grid, pairs

    def candidates_function(self):
        """`candidates` as a plain function of tensors `(query_tokens, query_mask, gallery_tokens, gallery_mask,
        candidates, queries_are_images)`, the re-ranking the evaluation room takes."""
        def rerank(q_tokens, q_mask, g_tokens, g_mask, candidates, queries_are_images):
            return self.candidates(TokenSet(q_tokens, q_mask), TokenSet(g_tokens, g_mask), candidates,
                                   queries_are_images)

        return rerank

    def _combine(self, t2i, i2t) -> torch.Tensor:
        """The configured direction's score: [a, b] for grid blocks, [P] for pair blocks."""
        if self.direction == "t2i":
            return t2i()
        if self.direction == "i2t":
            return i2t()
        return (t2i() + i2t()) / 2

    def _scores(self, block: Block) -> torch.Tensor:
        raise NotImplementedError


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _mask_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """0 where a token is real, -inf where it is padding: added, it masks a max or softmax (an addition's
    backward is free, a masked_fill's is another pass over the block)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class LateInteraction(TokenScorer):
    """FILIP / ColBERT: the mean over valid tokens of each token's best match on the other side."""

    def _scores(self, k: Block) -> torch.Tensor:
        def t2i():  # each word's best region, mean over the words
            s = k.s if bool(k.region_mask.all()) else k.s + _mask_bias(k.region_mask, k.s.dtype)
            return _masked_mean(s.max(k.r).values, k.word_mask.squeeze(k.r), k.w - 1)

        def i2t():  # each region's best word, mean over the regions
            s = k.s if bool(k.word_mask.all()) else k.s + _mask_bias(k.word_mask, k.s.dtype)
            return _pool_regions(s.max(k.w).values, k, _masked_mean)

        return self._combine(t2i, i2t)


def _pool_regions(per_region: torch.Tensor, k: Block, pool) -> torch.Tensor:
    """Pool a per-region result (`[a, R, b]`, pairs `[P, R]`) over the regions with their mask."""
    return pool(per_region, k.region_mask.squeeze(k.w), k.r)


class CrossAttention(TokenScorer):
    """SCAN's stacked cross attention, text-to-image and image-to-text.

    The attended vector of a word is never materialised: with attention weights `a` over the regions,
    `<word, attended> = sum_r a_r S[r, w]` and `|attended|^2 = a^T G a` (G the regions' Gram matrix), so
    memory per pair is R x W instead of W x D."""

    uses_gram = True

    def __init__(self, direction: str = "both", pooling: str = "lse", attention_scale: float = 9.0,
                 pooling_scale: float = 6.0, block_elements: int = 1 << 20):
        super().__init__(direction, block_elements)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling, self.attention_scale, self.pooling_scale = pooling, attention_scale, pooling_scale

    def _scores(self, k: Block) -> torch.Tensor:
        # padding tokens are zero (see forward), so s and its clipped form are 0 there: no norm sees them
        s, lam = k.s, self.attention_scale
        clipped = F.leaky_relu(s, 0.1)

        def t2i():  # words attend over regions: SCAN normalises over the words, softmax over the regions
            att = clipped * (lam / (clipped.norm(dim=k.w, keepdim=True) + 1e-8))
            if not bool(k.region_mask.all()):
                att = att + _mask_bias(k.region_mask, s.dtype)
            weights = torch.softmax(att, dim=k.r)
            dot = (weights * s).sum(k.r)
            norm_sq = (k.regions_gram(weights) * weights).sum(k.r)
            return self._pool(dot / norm_sq.clamp(min=1e-16).sqrt(), k.word_mask.squeeze(k.r), k.w - 1)

        def i2t():  # regions attend over words: normalised over the regions, softmax over the words
            att = clipped * (lam / (clipped.norm(dim=k.r, keepdim=True) + 1e-8))
            if not bool(k.word_mask.all()):
                att = att + _mask_bias(k.word_mask, s.dtype)
            weights = torch.softmax(att, dim=k.w)
            dot = (weights * s).sum(k.w)
            norm_sq = (k.words_gram(weights) * weights).sum(k.w)
            return _pool_regions(dot / norm_sq.clamp(min=1e-16).sqrt(), k, self._pool)

        return self._combine(t2i, i2t)

    def _pool(self, relevance: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
        mask = mask.expand_as(relevance)
        if self.pooling == "avg":
            return _masked_mean(relevance, mask, dim)
        lam = self.pooling_scale
        return torch.logsumexp((lam * relevance).masked_fill(~mask, float("-inf")), dim=dim) / lam


def build_token_scorer(cfg_tokens) -> TokenScorer:
    """The scorer of a config's `tokens` section."""
    if cfg_tokens.scorer == "late_interaction":
        return LateInteraction(cfg_tokens.direction, cfg_tokens.block_elements)
    return CrossAttention(cfg_tokens.direction, cfg_tokens.pooling, cfg_tokens.attention_scale,
                          cfg_tokens.pooling_scale, cfg_tokens.block_elements)
