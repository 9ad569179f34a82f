"""A BERT-style WordPiece tokenizer built from a dataset's training captions.

Saved as `tokenizer.json` (the `tokenizers` format) next to the shards. The
pipeline loads it with
    transformers.PreTrainedTokenizerFast(tokenizer_file=path, pad_token="[PAD]",
        unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
Do not load it with `BertTokenizerFast(vocab_file=...)`: in transformers 5 that
silently builds a 5-token tokenizer.

Why the vocabulary is chosen here and not by `tokenizers.trainers.WordPieceTrainer`:
that trainer breaks ties between equally frequent merges in hash-map order, so
training twice on the same captions gave a different vocabulary every time
(10 runs, 10 different files). Token ids must not depend on which machine or
process built the dataset (a checkpoint would read garbage on another copy),
so the vocabulary is made deterministically: the special tokens, every
character seen plus a-z and 0-9 (word-initial and `##` continuation forms, so any word made of
known characters tokenizes without [UNK]), then whole words by descending
count (ties alphabetical) up to `vocab_size`. A word outside the vocabulary
falls back to pieces (greedy longest match), the standard WordPiece behaviour.
"""
from __future__ import annotations

import string
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .fsutil import atomic_write_bytes

# Order fixes the ids: [PAD] must be 0 (the pipeline pads with 0).
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_VOCAB_SIZE = 8000
PREFIX = "##"
# Always in the vocabulary, so an unseen plain word becomes pieces, not [UNK].
BASE_ALPHABET = string.ascii_lowercase + string.digits


def _normalizer():
    return normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                      handle_chinese_chars=True, strip_accents=None)


def count_words(captions: Iterable[str]) -> Counter:
    """Word counts after the same normalisation and pre-tokenisation the tokenizer applies."""
    norm, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    captions = list(captions)
    # Many captions per call into Rust: one call per caption made COCO-sized sets 10x slower.
    # Joining with newlines changes nothing: both treat a newline as a word boundary.
    for start in range(0, len(captions), 2000):
        text = norm.normalize_str("\n".join(captions[start:start + 2000]))
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    return counts


def choose_vocab(counts: Counter, vocab_size: int, min_frequency: int = 1) -> list[str]:
    firsts = sorted({w[0] for w in counts} | set(BASE_ALPHABET))
    rests = sorted({PREFIX + ch for w in counts for ch in w[1:]} | {PREFIX + ch for ch in BASE_ALPHABET})
    vocab = SPECIAL_TOKENS + firsts + [r for r in rests if r not in firsts]
    known = set(vocab)
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in known),
                   key=lambda w: (-counts[w], w))
    room = max(0, vocab_size - len(vocab))
    return vocab + words[:room]


def build_wordpiece(captions: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 1, counts: Counter | None = None) -> Tokenizer:
    """From `captions`, or from their word counts (`count_words`, added up over chunks of a stream)."""
    vocab = choose_vocab(count_words(captions) if counts is None else counts, vocab_size, min_frequency)
    ids = {token: i for i, token in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix=PREFIX,
                                     max_input_chars_per_word=100))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix=PREFIX)
    for token in SPECIAL_TOKENS:  # never split or lower-cased inside text
        tok.add_special_tokens([token])
    return tok


def train_wordpiece(captions: Iterable[str], out_path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    min_frequency: int = 1, counts: Counter | None = None) -> int:
    """Build from `captions` (training split only), or their word `counts`, and save to `out_path`
    atomically.

    Returns the vocabulary size reached (below `vocab_size` when the captions
    hold fewer distinct words).
    """
    tok = build_wordpiece(captions, vocab_size, min_frequency, counts)
    atomic_write_bytes(Path(out_path), tok.to_str(pretty=True).encode("utf-8"))
    return tok.get_vocab_size()
