"""Token objectives under 2-process gloo DDP equal one process at the doubled batch (loss and gradients),
with the ranks' captions of different token lengths; and each objective prefers aligned pairs."""
import os
import subprocess
import sys

import pytest
import torch

from pipeline.models.heads import TokenHead
from pipeline.models.token_scorers import CrossAttention, LateInteraction
from pipeline.objectives.tokens import token_alignment_loss
from tests.helpers.ddp import WORLD, assert_equal_results, single_process, two_processes
from tests.helpers.runs import ROOT

B, R, D_IN, D_OUT = 4, 3, 6, 8
WIDTH = (5, 7)  # caption token slots on rank 0 and rank 1: the gather must pad rank 0's


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * B, R, D_IN, generator=g)
    texts = torch.randn(WORLD * B, max(WIDTH), D_IN, generator=g)
    lengths = torch.cat([torch.randint(1, w + 1, (B,), generator=g) for w in WIDTH])
    text_mask = torch.arange(max(WIDTH))[None] < lengths[:, None]
    image_mask = torch.ones(WORLD * B, R, dtype=torch.bool)
    image_mask[2, 2] = False  # one padded region
    ids = torch.arange(WORLD * B)
    ids[1] = ids[6]  # one image twice in the batch, on both ranks: a false negative to mask
    return images, image_mask, texts, text_mask, ids


def _heads():
    torch.manual_seed(1)
    return TokenHead(D_IN, D_OUT), TokenHead(D_IN, D_OUT)


SCORERS = {"late": LateInteraction("both"), "scan": CrossAttention("both", "lse", 4.0, 5.0)}
CASES = [(s, l) for s in SCORERS for l in ("infonce", "vse_max_violation")]


def _loss(scorer, loss, heads, images, image_mask, texts, text_mask, ids):
    img, txt = heads[0](images, image_mask), heads[1](texts, text_mask)
    grid, _ = SCORERS[scorer].functions()
    return token_alignment_loss(grid, img.tokens, img.mask, txt.tokens, txt.mask, ids, loss, torch.tensor(10.0), 0.2)


def _loss_of(name, rows):
    """The loss of case `name` ("scorer/loss") on the rows `rows` of the doubled batch, each rank's captions
    cut to its own token width (one process at the doubled batch keeps the widest)."""
    scorer, loss = name.split("/")
    images, image_mask, texts, text_mask, ids = _data()
    width = WIDTH[rows.start // B] if rows.stop - rows.start == B else max(WIDTH)
    heads = _heads()
    value = _loss(scorer, loss, heads, images[rows], image_mask[rows], texts[rows, :width], text_mask[rows, :width],
                  ids[rows])
    return value, [p for h in heads for p in h.parameters()]


NAMES = [f"{s}/{l}" for s, l in CASES]


def _ddp_results():
    # spawned ranks (the shared helper): a forked child inherits torch's thread pool from a parent that
    # has already run math, and hangs in it
    return two_processes(_loss_of, NAMES, B)


@pytest.fixture(scope="module")
def ddp_results():
    return _ddp_results()


def test_ddp_workers_start_after_torch_has_run_math_in_this_process():
    """Whatever ran before in the test process (other modules' math starts torch's thread pool), starting
    the ranks must not hang: a forked child inherits a pool it cannot use. Run with two math threads."""
    code = ("import torch\n"
            "torch.nn.Linear(256, 256)(torch.randn(512, 256)).sum()\n"
            "from tests.objectives.test_token_objectives import _ddp_results\n"
            "assert len(_ddp_results()) == 4\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the DDP ranks did not finish in 180 s after torch math in the parent: a hang")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", NAMES)
def test_token_loss_under_ddp_equals_one_process_at_the_doubled_batch(name, ddp_results):
    assert_equal_results(ddp_results[name], single_process(_loss_of, name, B))


@pytest.mark.parametrize("scorer,loss", CASES)
def test_token_loss_is_lower_for_aligned_than_for_shuffled_pairs(scorer, loss):
    """Captions made of their image's tokens (noisy) against the same captions given to other images: a
    flipped sign or a wrong target fails here."""
    g = torch.Generator().manual_seed(3)
    n = 12
    images = torch.randn(n, R, D_OUT, generator=g)
    texts = torch.cat([images, images[:, :1]], dim=1) + 0.3 * torch.randn(n, R + 1, D_OUT, generator=g)
    image_mask, text_mask = torch.ones(n, R, dtype=torch.bool), torch.ones(n, R + 1, dtype=torch.bool)
    grid, _ = SCORERS[scorer].functions()
    norm = torch.nn.functional.normalize

    def value(t):
        return token_alignment_loss(grid, norm(images, dim=-1), image_mask, norm(t, dim=-1), text_mask, None, loss,
                                    torch.tensor(10.0), 0.2)

    shuffled = texts[torch.roll(torch.arange(n), 1)]
    assert value(texts) < value(shuffled) - 0.05, (value(texts), value(shuffled))
