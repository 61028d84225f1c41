"""Byte-level text corpora: the embedded default (Python's own standard library) or user files.

A :class:`Corpus` is every document's bytes in one ``uint8`` array, each
document preceded by :data:`SEPARATOR` (a byte no Python source or text file
contains), plus the offset where each document starts. Tokens are bytes, so
the vocabulary is ``VOCAB_SIZE = 256`` and a model's loss in nats per token
converts straight to bits per byte.

The default corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
in sorted path order (``site-packages`` and ``test``/``tests`` folders left
out) after the ``pydoc_data.topics`` help texts: about 12 MB of real
text that ships with every Python. Reading 800 files takes seconds on a busy
machine, so the concatenated array is cached as ``.npz`` under
:func:`cache_dir`, keyed by every file's path, size and mtime and the size cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
from collections.abc import Callable, Sequence

import numpy as np

_log = logging.getLogger("effarch.data")

VOCAB_SIZE = 256
# Precedes every document; NUL never occurs in source or text files.
SEPARATOR = 0
# Suffixes read when a folder is given (files given by name are read whatever their suffix).
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Folders of the standard library left out of the default corpus.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
DEFAULT_CORPUS = "stdlib"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents as one byte stream (or, after :func:`tokenize`, one stream of token ids).

    Attributes:
      data: ``uint8 [N]``: every document, each preceded by ``SEPARATOR``; or
        ``int32 [N]`` token ids, each document preceded by a separator id.
      doc_starts: ``int64 [num_docs]``: offset in ``data`` of each document's separator.
      names: one name per document (a path, or ``pydoc_data.topics:<key>``).
    """

    data: np.ndarray
    doc_starts: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self):
        if self.data.dtype not in (np.uint8, np.int32) or self.data.ndim != 1:
            raise ValueError(f"Corpus.data has dtype {self.data.dtype} shape {self.data.shape}; expected uint8 [N] "
                             "(bytes) or int32 [N] (token ids).")
        if len(self.doc_starts) != len(self.names):
            raise ValueError(f"Corpus has {len(self.doc_starts)} doc_starts but {len(self.names)} names.")
        if len(self.names) == 0 or self.doc_starts[0] != 0:
            raise ValueError("Corpus needs at least one document, the first starting at offset 0.")

    @property
    def num_docs(self) -> int:
        return len(self.names)

    @property
    def is_bytes(self) -> bool:
        """Whether the stream is bytes (vocabulary 256) rather than token ids."""
        return self.data.dtype == np.uint8

    def document(self, i: int) -> bytes:
        """Bytes of document ``i``, without its separator (a byte corpus only)."""
        if not self.is_bytes:
            raise ValueError("Corpus.document: this corpus holds token ids; split and select documents on the "
                             "byte corpus, then tokenize each part.")
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else len(self.data)
        return self.data[self.doc_starts[i] + 1 : end].tobytes()

    def select(self, indices: Sequence[int]) -> "Corpus":
        """A corpus of documents ``indices``, in that order."""
        docs = [self.document(i) for i in indices]
        return from_documents(docs, [self.names[i] for i in indices])


def from_documents(docs: Sequence[bytes], names: Sequence[str]) -> Corpus:
    """Packs ``docs`` into one separator-delimited stream."""
    if len(docs) != len(names) or not docs:
        raise ValueError(f"from_documents got {len(docs)} documents and {len(names)} names; expected equal, >= 1.")
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    data = np.frombuffer(b"".join(bytes([SEPARATOR]) + d for d in docs), dtype=np.uint8)
    return Corpus(data=data, doc_starts=starts, names=tuple(names))


def tokenize(corpus: Corpus, encode: Callable[[str], Sequence[int]], separator: int) -> Corpus:
    """A byte corpus as token ids: each document's text (UTF-8) through ``encode``, after ``separator``.

    Args:
      corpus: a byte corpus.
      encode: text -> token ids (e.g. a Hugging Face tokenizer's ``encode``
        without special tokens).
      separator: the id that precedes every document (e.g. the tokenizer's
        end-of-sequence id), as the separator byte does in a byte corpus.

    Returns:
      An ``int32`` corpus with the same documents and names.
    """
    if not corpus.is_bytes:
        raise ValueError("tokenize: the corpus already holds token ids.")
    if not isinstance(separator, (int, np.integer)) or separator < 0:
        raise ValueError(f"tokenize: separator={separator!r}; expected a token id >= 0.")
    pieces = [np.asarray([separator, *encode(corpus.document(i).decode("utf-8", errors="replace"))], np.int32)
              for i in range(corpus.num_docs)]
    lengths = np.array([len(p) for p in pieces], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return Corpus(data=np.concatenate(pieces), doc_starts=starts, names=corpus.names)


def cache_dir() -> pathlib.Path:
    """Where corpora are cached: ``$EFFARCH_CACHE`` or ``~/.cache/effarch``."""
    return pathlib.Path(os.environ.get("EFFARCH_CACHE", pathlib.Path.home() / ".cache" / "effarch"))


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's ``.py`` files, sorted, without site-packages and test folders."""
    files = []
    for folder, subdirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS]
        files.extend(pathlib.Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def _expand(paths: Sequence[str]) -> list[pathlib.Path]:
    """Files named in ``paths``; folders expand to their text files, sorted."""
    files = []
    for entry in paths:
        path = pathlib.Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"data folder {str(path)!r} holds no files ending in {TEXT_SUFFIXES}.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path {entry!r} is neither a file nor a folder.")
    return files


def _read(files: Sequence[pathlib.Path], extra: Sequence[tuple[str, bytes]], max_bytes: int | None) -> Corpus:
    """Reads ``extra`` (name, bytes) documents then ``files`` until ``max_bytes`` is reached."""
    docs, names, total = [], [], 0
    sources = list(extra) + [(str(f), f) for f in files]
    for name, source in sources:
        if max_bytes is not None and total >= max_bytes:
            break
        doc = source.read_bytes() if isinstance(source, pathlib.Path) else source
        if not doc:
            continue
        docs.append(doc)
        names.append(name)
        total += len(doc) + 1
    if not docs:
        raise ValueError(f"no non-empty documents among {len(sources)} sources.")
    return from_documents(docs, names)


def _pydoc_topics() -> list[tuple[str, bytes]]:
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel

    return [(f"pydoc_data.topics:{k}", topics.topics[k].encode("utf-8")) for k in sorted(topics.topics)]


def load_corpus(paths: Sequence[str] | str = DEFAULT_CORPUS, *, max_bytes: int | None = None,
                use_cache: bool = True) -> Corpus:
    """Loads a byte-level corpus.

    Args:
      paths: ``"stdlib"`` (the default corpus), or files and folders; a folder
        contributes its files ending in ``TEXT_SUFFIXES``, recursively, sorted.
      max_bytes: stop adding documents once this many bytes are read (the
        document that crosses the cap is kept whole); ``None`` reads all.
      use_cache: read and write the ``.npz`` cache under :func:`cache_dir`.

    Returns:
      The corpus, documents in a deterministic order.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}; expected a positive int or None.")
    if isinstance(paths, str):
        paths = [paths]
    if list(paths) == [DEFAULT_CORPUS]:
        files, extra = stdlib_files(), _pydoc_topics()
    else:
        files, extra = _expand(paths), []
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(
        json.dumps([stats, [(n, hashlib.sha256(b).hexdigest()) for n, b in extra], max_bytes]).encode()
    ).hexdigest()[:20]
    cached = cache_dir() / f"corpus-{key}.npz"
    if use_cache and cached.exists():
        with np.load(cached) as z:
            return Corpus(data=z["data"], doc_starts=z["doc_starts"], names=tuple(z["names"].tolist()))
    corpus = _read(files, extra, max_bytes)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, data=corpus.data, doc_starts=corpus.doc_starts, names=np.array(corpus.names))
        os.replace(tmp, cached)
        _log.info("cached corpus of %d documents, %d bytes at %s", corpus.num_docs, len(corpus.data), cached)
    return corpus


def _holdout_score(doc: bytes) -> float:
    """A deterministic number in [0, 1) from a document's content."""
    return int.from_bytes(hashlib.sha256(doc).digest()[:8], "big") / 2.0**64


def split(corpus: Corpus, eval_fraction: float) -> tuple[Corpus, Corpus]:
    """Splits into (train, held-out) corpora, deterministically.

    A document is held out when the hash of its content falls below
    ``eval_fraction``, so the split does not depend on the order or the set of
    other documents. When that leaves either side empty (a corpus of one or a
    few documents) the stream is cut instead: the last ``eval_fraction`` of
    the bytes are held out.

    Args:
      corpus: the documents.
      eval_fraction: share of documents (or bytes) held out, in (0, 1).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}; expected a number in (0, 1).")
    held = [_holdout_score(corpus.document(i)) < eval_fraction for i in range(corpus.num_docs)]
    train_idx = [i for i, h in enumerate(held) if not h]
    eval_idx = [i for i, h in enumerate(held) if h]
    if train_idx and eval_idx:
        return corpus.select(train_idx), corpus.select(eval_idx)
    _log.info("hash split of %d documents leaves a side empty; holding out the last %.1f%% of bytes",
              corpus.num_docs, 100 * eval_fraction)
    cut = int(len(corpus.data) * (1.0 - eval_fraction))
    if cut < 2 or len(corpus.data) - cut < 2:
        raise ValueError(f"corpus of {len(corpus.data)} bytes is too small to hold out {eval_fraction=}.")
    train_docs = corpus.doc_starts[corpus.doc_starts < cut]
    train = Corpus(data=corpus.data[:cut], doc_starts=train_docs, names=corpus.names[: len(train_docs)])
    # The held-out stream starts mid-document: it opens with a separator of its own.
    first = len(train_docs) - 1
    rest = corpus.doc_starts[corpus.doc_starts >= cut] - cut + 1
    held_out = Corpus(
        data=np.concatenate([[SEPARATOR], corpus.data[cut:]]).astype(np.uint8),
        doc_starts=np.concatenate([[0], rest]).astype(np.int64),
        names=(corpus.names[first],) + corpus.names[first + 1 :],
    )
    return train, held_out
