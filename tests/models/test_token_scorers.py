"""The token scorers against slow, obviously correct loops over pairs (SCAN's and FILIP's formulas written
out on the valid tokens only), on random tensors with random padding; padding never changes a score."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.token_scorers import CrossAttention, LateInteraction, TokenSet

D = 8


def _token_set(n: int, length: int, gen: torch.Generator, full: bool = False) -> TokenSet:
    """Normalised tokens; random lengths (>= 1); padding slots hold random garbage, never zeros."""
    tokens = F.normalize(torch.randn(n, length, D, generator=gen, dtype=torch.float64), dim=-1)
    lengths = torch.full((n,), length) if full else torch.randint(1, length + 1, (n,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    garbage = 3 * torch.randn(n, length, D, generator=gen, dtype=torch.float64)
    return TokenSet(torch.where(mask[..., None], tokens, garbage), mask)


def _late_pair(v, e, direction):
    s = v @ e.T  # [R, W] of valid tokens only
    t2i, i2t = s.max(0).values.mean(), s.max(1).values.mean()
    return {"t2i": t2i, "i2t": i2t, "both": (t2i + i2t) / 2}[direction]


def _scan_one_way(query, context, lam1, lam2, pooling):
    """SCAN's func_attention + pooling for one pair, one direction: each query token attends over the
    context tokens (LeakyReLU(0.1), L2 over the query tokens, softmax over the context), relevance =
    cosine(query token, attended vector), pooled by LSE or mean. Loops over query tokens."""
    sim = context @ query.T  # [context, query]
    clipped = F.leaky_relu(sim, 0.1)
    clipped = clipped / (clipped.norm(dim=1, keepdim=True) + 1e-8)
    relevance = []
    for j in range(query.shape[0]):
        weights = torch.softmax(lam1 * clipped[:, j], dim=0)
        attended = (weights[:, None] * context).sum(0)
        relevance.append(F.cosine_similarity(query[j], attended, dim=0, eps=1e-12))
    relevance = torch.stack(relevance)
    if pooling == "avg":
        return relevance.mean()
    return torch.log(torch.exp(lam2 * relevance).sum()) / lam2


def _scan_pair(v, e, direction, pooling, lam1=9.0, lam2=6.0):
    t2i = _scan_one_way(e, v, lam1, lam2, pooling)  # words attend over regions
    i2t = _scan_one_way(v, e, lam1, lam2, pooling)  # regions attend over words
    return {"t2i": t2i, "i2t": i2t, "both": (t2i + i2t) / 2}[direction]


def _slow(images: TokenSet, texts: TokenSet, pair) -> torch.Tensor:
    out = torch.empty(len(images), len(texts), dtype=torch.float64)
    for a in range(len(images)):
        for b in range(len(texts)):
            out[a, b] = pair(images.tokens[a][images.mask[a]], texts.tokens[b][texts.mask[b]])
    return out


SCORERS = [("late", d, None) for d in ("both", "t2i", "i2t")] + [
    ("scan", d, p) for d in ("both", "t2i", "i2t") for p in ("lse", "avg")]


def _make(kind, direction, pooling, block_elements=1 << 20):
    if kind == "late":
        return LateInteraction(direction, block_elements), lambda v, e: _late_pair(v, e, direction)
    return (CrossAttention(direction, pooling, 9.0, 6.0, block_elements),
            lambda v, e: _scan_pair(v, e, direction, pooling))


@pytest.mark.parametrize("kind,direction,pooling", SCORERS)
def test_scorer_equals_a_loop_over_pairs(kind, direction, pooling):
    gen = torch.Generator().manual_seed(0)
    images, texts = _token_set(5, 6, gen), _token_set(7, 9, gen)
    scorer, pair = _make(kind, direction, pooling)
    want = _slow(images, texts, pair)
    assert torch.allclose(scorer(images, texts), want, atol=1e-9), (scorer(images, texts) - want).abs().max()
    # tiny blocks: many blocks of both sides, the same scores
    small, _ = _make(kind, direction, pooling, block_elements=40)
    assert torch.allclose(small(images, texts), want, atol=1e-9)
    # pairs (the re-ranking path): image i with caption i
    idx_i, idx_t = torch.tensor([0, 4, 2, 2, 1]), torch.tensor([6, 0, 3, 5, 1])
    assert torch.allclose(small.pairs(images[idx_i], texts[idx_t]), want[idx_i, idx_t], atol=1e-9)


@pytest.mark.parametrize("kind,direction,pooling", SCORERS)
def test_candidates_equal_the_loop_without_the_pairs_path(kind, direction, pooling, monkeypatch):
    """The re-ranking fast path (each query against its K candidates at once) gives the loop's scores in
    both directions, in chunks of queries too, and never falls back to `pairs` on repeated queries."""
    gen = torch.Generator().manual_seed(2)
    images, texts = _token_set(5, 6, gen), _token_set(7, 9, gen)
    scorer, pair = _make(kind, direction, pooling, block_elements=100)  # several chunks of queries
    want = _slow(images, texts, pair)
    monkeypatch.setattr(type(scorer), "pairs", lambda *a, **k: pytest.fail("candidates fell back to pairs"))
    to_texts = torch.tensor([[0, 3, 6], [1, 1, 2], [6, 5, 4], [0, 2, 4], [3, 4, 5]])  # one row per image
    assert torch.allclose(scorer.candidates(images, texts, to_texts, True),
                          want.gather(1, to_texts), atol=1e-9)
    to_images = torch.tensor([[0, 4], [1, 2], [3, 3], [2, 4], [0, 1], [4, 0], [1, 3]])  # one row per caption
    assert torch.allclose(scorer.candidates(texts, images, to_images, False),
                          want.T.gather(1, to_images), atol=1e-9)


@pytest.mark.parametrize("kind,direction,pooling", SCORERS)
def test_padding_never_changes_a_score(kind, direction, pooling):
    gen = torch.Generator().manual_seed(1)
    images, texts = _token_set(4, 5, gen), _token_set(6, 7, gen)
    scorer, _ = _make(kind, direction, pooling)
    before = scorer(images, texts)
    longer = texts.padded(12)  # more padding slots, filled with other garbage
    longer.tokens[:, 7:] = 5 * torch.randn(6, 5, D, generator=gen, dtype=torch.float64)
    regions = images.padded(8)
    regions.tokens[:, 5:] = -4 * torch.randn(4, 3, D, generator=gen, dtype=torch.float64)
    assert torch.allclose(scorer(regions, longer), before, atol=1e-12)
    # the scorer sees what the tokens say, not the garbage: changing a real token changes the score
    texts.tokens[0, 0] = -texts.tokens[0, 0]
    assert not torch.allclose(scorer(images, texts)[:, 0], before[:, 0])


def test_scores_flow_gradients_to_the_real_tokens_only():
    gen = torch.Generator().manual_seed(2)
    images, texts = _token_set(3, 4, gen), _token_set(3, 6, gen)
    for scorer in (LateInteraction("both"), CrossAttention("both", "lse")):
        v = images.tokens.clone().requires_grad_(True)
        e = texts.tokens.clone().requires_grad_(True)
        scorer(TokenSet(v, images.mask), TokenSet(e, texts.mask)).sum().backward()
        assert torch.isfinite(v.grad).all() and torch.isfinite(e.grad).all()
        assert (v.grad[~images.mask] == 0).all() and (e.grad[~texts.mask] == 0).all()
        assert v.grad[images.mask].abs().sum() > 0


def test_token_set_cat_pads_to_the_longest():
    gen = torch.Generator().manual_seed(3)
    a, b = _token_set(2, 3, gen), _token_set(3, 5, gen)
    both = TokenSet.cat([a, b])
    assert both.tokens.shape == (5, 5, D) and both.mask[:2, 3:].sum() == 0
    assert torch.equal(both.tokens[:2, :3], a.tokens) and torch.equal(both.mask[2:], b.mask)
