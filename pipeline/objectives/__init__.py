"""The objectives room: losses on tensors. No models, no data, no metrics: a new objective takes
embeddings or codes (and ids / labels as tensors) and returns a scalar; under DDP it gathers with
`distributed.gather_with_grad` so that W ranks at batch B equal one process at batch W*B.

    distributed.py   gather with / without gradients
    contrastive.py   fine-grained: InfoNCE, VSE++ hardest negative, on embeddings or on score rows
    tokens.py        token level: token sets gathered (padded), a scorer's rows, the same two losses
    ucch.py          hashing, unsupervised: UCCH's memory-bank contrast and ranking loss
    supervised.py    hashing from labels: DCMH's pairwise likelihood, UCCH's optional label term
    instance.py      hashing for instance retrieval: contrast on the codes, distillation from a teacher
    binary.py        terms on relaxed codes: quantisation to binary targets, bit balance
    nested.py        nested codes: a loss on every prefix
"""
