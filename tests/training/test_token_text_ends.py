"""`tokens.text_ends: drop`: a caption's first and last real token leave its token set, wherever the padding
is, and a caption of two or fewer tokens keeps its own."""
import torch

from pipeline.training.token_aligner import without_ends


def test_first_and_last_real_token_leave_the_set():
    mask = torch.tensor([[1, 1, 1, 1, 0],   # right padding: [CLS] w w [SEP] pad
                         [0, 1, 1, 1, 1],   # left padding
                         [1, 1, 1, 0, 0],   # one word left
                         [1, 1, 0, 0, 0],   # two tokens: kept
                         [1, 0, 0, 0, 0]]).bool()
    want = torch.tensor([[0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 0, 0, 0, 0]]).bool()
    assert torch.equal(without_ends(mask), want)
