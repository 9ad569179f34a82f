"""The objectives room: losses on tensors. No models, no data, no metrics: a new objective takes
embeddings or codes (and ids / labels as tensors) and returns a scalar; under DDP it gathers with
`distributed.gather_with_grad` so that W ranks at batch B equal one process at batch W*B.

    distributed.py   gather with / without gradients
    contrastive.py   fine-grained: InfoNCE, VSE++ hardest negative, on embeddings or on score rows
    tokens.py        token level: token sets gathered (padded), a scorer's rows, the same two losses
    hashing.py       hashing: UCCH memory-bank contrast and ranking loss, label similarity
"""
