"""Data: the batch protocol, byte-level text corpora, packed, resumable loaders and synthetic tasks.

    from effarch import data
    corpus = data.load_corpus()                      # Python's stdlib sources
    train, held_out = data.split(corpus, eval_fraction=0.05)
    ds = data.PackedText(train, batch_size=16, seq_len=256, seed=0)
    batch = ds.batch(step)                           # pure function of (seed, step)
    ids = data.tokenize(train, tokenizer.encode, separator=tokenizer.eos_token_id)  # subword ids
    ds = data.PackedText(ids, batch_size=16, seq_len=256, seed=0, vocab_size=tokenizer.vocab_size)

    from effarch.data import synthetic                # MQAR (Zoology) and the six MAD tasks
    inputs, targets = synthetic.mqar(0, 100_000, seq_len=256, num_kv_pairs=16)
"""

from effarch.data import synthetic
from effarch.data.loader import BATCH_KEYS, Batch, Dataset, PackedText, check_batch
from effarch.data.text import (
    DEFAULT_CORPUS, SEPARATOR, VOCAB_SIZE, Corpus, from_documents, load_corpus, split, tokenize,
)

__all__ = [
    "BATCH_KEYS", "Batch", "Corpus", "DEFAULT_CORPUS", "Dataset", "PackedText", "SEPARATOR",
    "VOCAB_SIZE", "check_batch", "from_documents", "load_corpus", "split", "synthetic",
    "tokenize",
]
