"""Byte-level corpora: packing documents, loading files and the stdlib, caching, the held-out split."""

import numpy as np
import pytest

from effarch import data


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFARCH_CACHE", str(tmp_path / "cache"))


def _write(folder, files):
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_from_documents_puts_a_separator_before_each_document():
    corpus = data.from_documents([b"ab", b"", b"xyz"], ["a", "b", "c"])
    np.testing.assert_array_equal(corpus.data, [0, 97, 98, 0, 0, 120, 121, 122])
    np.testing.assert_array_equal(corpus.doc_starts, [0, 3, 4])
    assert [corpus.document(i) for i in range(3)] == [b"ab", b"", b"xyz"]
    assert corpus.select([2, 0]).document(0) == b"xyz"


def test_load_folder_sorted_with_suffix_filter_and_cap(tmp_path):
    _write(tmp_path, {"b.txt": b"bbbb", "a/z.py": b"zz", "skip.bin": b"\x01\x02", "c.md": b"c" * 100})
    corpus = data.load_corpus([str(tmp_path)])
    assert [n.rsplit("/", 1)[-1] for n in corpus.names] == ["z.py", "b.txt", "c.md"]
    assert corpus.document(1) == b"bbbb"
    capped = data.load_corpus([str(tmp_path)], max_bytes=5)
    assert capped.num_docs == 2  # the document that crosses the cap is kept whole


def test_single_file_and_missing_path(tmp_path):
    _write(tmp_path, {"one.dat": b"hello"})
    assert data.load_corpus([str(tmp_path / "one.dat")]).document(0) == b"hello"
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        data.load_corpus([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="max_bytes=0"):
        data.load_corpus([str(tmp_path)], max_bytes=0)


def test_cache_is_used_and_invalidated_by_changes(tmp_path):
    folder = tmp_path / "docs"
    _write(folder, {"a.txt": b"first"})
    first = data.load_corpus([str(folder)])
    assert len(list((tmp_path / "cache").glob("corpus-*.npz"))) == 1
    again = data.load_corpus([str(folder)])
    np.testing.assert_array_equal(first.data, again.data)
    assert again.names == first.names
    _write(folder, {"a.txt": b"changed!"})
    assert data.load_corpus([str(folder)]).document(0) == b"changed!"


def test_default_corpus_is_the_standard_library():
    corpus = data.load_corpus(max_bytes=600_000)
    assert corpus.names[0].startswith("pydoc_data.topics:")
    files = [n for n in corpus.names if not n.startswith("pydoc_data")]
    assert files and all(n.endswith(".py") for n in files)
    assert files == sorted(files)
    assert not any("/site-packages/" in n or "/test/" in n or "/tests/" in n for n in files)
    assert not np.any(corpus.data[np.setdiff1d(np.arange(len(corpus.data)), corpus.doc_starts)] == data.SEPARATOR)


def test_split_by_hash_is_deterministic_disjoint_and_order_free():
    docs = [f"document number {i}\n".encode() * (i + 1) for i in range(60)]
    corpus = data.from_documents(docs, [str(i) for i in range(60)])
    train, held = data.split(corpus, 0.2)
    assert set(train.names).isdisjoint(held.names)
    assert sorted(train.names + held.names, key=int) == list(corpus.names)
    assert 3 <= held.num_docs <= 25
    reordered = corpus.select(list(range(59, -1, -1)))
    assert sorted(data.split(reordered, 0.2)[1].names) == sorted(held.names)


def test_split_falls_back_to_the_tail_for_one_document():
    corpus = data.from_documents([bytes(range(1, 101))], ["only"])
    train, held = data.split(corpus, 0.1)
    assert len(train.data) + len(held.data) == len(corpus.data) + 1  # held-out gets its own separator
    assert held.data[0] == data.SEPARATOR and held.document(0) == bytes(range(90, 101))  # 101 bytes, cut at 90
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split(corpus, 1.0)
