"""The models room: plain nn.Modules, injected into the LightningModules of `pipeline.training`.

    encoders.py   image and text encoders -> Encoded(vector, tokens, mask): SmallCNN, any transformers
                  vision / text model, precomputed features, frozen wrappers
    towers.py     what trainable encoders share: locking all but the last blocks, activation
                  checkpointing, train / eval mode
    heads.py      retrieval heads: embedding (cosine) and hash (tanh; sign at test) on the global vector,
                  token embeddings on the tokens
    token_scorers.py  token-level scorers of image and caption token sets: late interaction (FILIP /
                  ColBERT) and cross-attention (SCAN), blockwise, padding masked

A new encoder or head goes here. Imports `pipeline.config` only (for its errors); no data, no losses.
"""
