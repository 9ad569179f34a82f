"""The models room: plain nn.Modules, injected into the LightningModules of `pipeline.training`.

    encoders.py   image and text encoders -> Encoded(vector, tokens, mask): SmallCNN, any transformers
                  vision / text model, precomputed features, frozen wrappers
    heads.py      retrieval heads on the global vector: embedding (cosine) and hash (tanh; sign at test)

A new encoder or head goes here. Imports `pipeline.config` only (for its errors); no data, no losses.
"""
