"""The data room: shards (data_prep's contract: the card, the sample schema) -> decoded, tokenised
batches for one process of a run. Imports `data_prep` and `pipeline.config` only; knows nothing of
models, objectives or metrics.

    stream.py      build_stream: the whole data stream in one function, and its size
    shard_reader.py  a shard from a folder, a server or the user's command; retries, lost records counted
    records.py     a record -> tensors (skipped and counted when bad); records -> a batch
    seeds.py       the epoch shared with the workers, per-stream seeds
    datamodule.py  the LightningDataModule, the dataset (or shapes default), the tokenizer
"""
from data_prep import DataError, DatasetCard
from pipeline.data.datamodule import (NoTokenizer, RetrievalDataModule, check_model_inputs, load_tokenizer,
                                      resolve_dataset, wordpiece_tokenizer)
from pipeline.data.records import MAX_CAPTIONS, Collate, RecordDecoder, center_square, image_transform, tokenize
from pipeline.data.seeds import SharedEpoch
from pipeline.data.stream import build_stream, shard_runs, train_steps

__all__ = ["Collate", "DataError", "DatasetCard", "MAX_CAPTIONS", "NoTokenizer", "RecordDecoder",
           "RetrievalDataModule", "SharedEpoch", "build_stream", "center_square", "check_model_inputs",
           "image_transform", "load_tokenizer", "resolve_dataset", "shard_runs", "tokenize", "train_steps",
           "wordpiece_tokenizer"]
