"""The inference room: encoders applied to data outside training. A trained run loaded back from its
folder (runs.py), a split encoded with it and timed (encoding.py), and a config's frozen encoders run
once over a dataset into feature shards (features.py, python -m pipeline.features).

May import config, data, models, training (to rebuild a run's module) and evaluation.
"""
