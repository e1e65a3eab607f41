"""Corpus split, fingerprint (velora.training.corpus), tokenizers (.tokenizer) and the batch order (.data)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from velora.training.corpus import LOCAL_PIECE_LINES, hash_fraction, load_corpus, load_stdlib, split_of, stdlib_files
from velora.training.data import TokenBlocks, tokenize_documents
from velora.training.tokenizer import ByteTokenizer, bpe_cache_path, load_tokenizer


def _write_corpus(folder, n_files=6, lines=120):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"file {i} line {j}: the quick brown fox {i * j % 7} jumps\n" for j in range(lines))
        (folder / f"doc{i}.txt").write_text(body)
    return folder


def test_hash_fraction_is_sha256_prefix():
    key = "json/decoder.py"
    expected = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2.0**64
    assert hash_fraction(key) == expected
    assert split_of(key, expected + 1e-12) == "validation"
    assert split_of(key, expected) == "train"


def test_stdlib_split_is_deterministic_and_by_path():
    first = load_stdlib("code", val_fraction=0.1, max_train_chars=200_000, max_val_chars=50_000)
    second = load_stdlib("code", val_fraction=0.1, max_train_chars=200_000, max_val_chars=50_000)
    assert first.train == second.train and first.validation == second.validation
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint["python"] and len(first.fingerprint["files_sha256"]) == 64
    assert sum(map(len, first.train)) == 200_000
    # every validation file's path hashes below the fraction, and no text appears on both sides
    paths = stdlib_files()
    n_val = sum(split_of(p, 0.1) == "validation" for p in paths)
    assert first.fingerprint["n_validation_files"] == n_val
    assert 0 < n_val < len(paths)
    assert not set(first.train) & set(first.validation)


def test_local_folder_split_is_deterministic_and_independent_of_creation_order(tmp_path):
    a = load_corpus(str(_write_corpus(tmp_path / "a")), val_fraction=0.2)
    # same files written in reverse order into another folder
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    for i in reversed(range(6)):
        (b_dir / f"doc{i}.txt").write_text((tmp_path / "a" / f"doc{i}.txt").read_text())
    b = load_corpus(str(b_dir), val_fraction=0.2)
    assert a.train == b.train and a.validation == b.validation
    assert a.fingerprint["content_sha256"] == b.fingerprint["content_sha256"]
    n_pieces = 6 * (120 // LOCAL_PIECE_LINES + 1)
    assert len(a.train) + len(a.validation) == n_pieces and a.validation and a.train


def test_local_single_file_gets_a_validation_piece(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(2 * LOCAL_PIECE_LINES)))
    corpus = load_corpus(str(path), val_fraction=0.01)
    assert len(corpus.train) == 1 and len(corpus.validation) == 1


def test_bad_data_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "tiny.txt").write_text("one line\n")
    with pytest.raises(ValueError, match="too little text"):
        load_corpus(str(tmp_path / "tiny.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("stdlib", val_fraction=0.0)


def test_bpe_is_trained_once_then_read_from_cache(tmp_path):
    corpus = load_corpus(str(_write_corpus(tmp_path / "c")), val_fraction=0.2)
    cache = tmp_path / "cache"
    path = bpe_cache_path(corpus, 300, 50_000, cache)
    assert not path.exists()
    first = load_tokenizer("bpe", corpus, vocab_size=300, bpe_train_chars=50_000, cache_dir=cache)
    assert path.exists() and first.vocab_size == 300
    stamp = path.stat().st_mtime_ns
    second = load_tokenizer("bpe", corpus, vocab_size=300, bpe_train_chars=50_000, cache_dir=cache)
    assert path.stat().st_mtime_ns == stamp  # not re-trained
    text = corpus.validation[0] + " ünïcödé ✓"
    assert second.encode_batch([text]) == first.encode_batch([text])
    assert second.decode(second.encode_batch([text])[0]) == text  # byte-level: lossless
    assert len(first.encode_batch([corpus.train[0]])[0]) < len(corpus.train[0].encode())  # it merges
    # a different vocabulary is a different cache entry
    assert bpe_cache_path(corpus, 400, 50_000, cache) != path


def test_byte_tokenizer_and_stream():
    tokenizer = ByteTokenizer()
    ids = tokenize_documents(tokenizer, ["ab", "é"])
    assert ids.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]
    assert tokenizer.decode(ids.tolist()) == "abé"


def test_token_blocks_order_is_a_pure_function_of_the_batch_index():
    ids = torch.arange(10 * 4)
    blocks = TokenBlocks(ids, seq_len=4, seed=3)
    fresh = TokenBlocks(ids, seq_len=4, seed=3)
    epoch0 = torch.cat([blocks.batch(k, 2) for k in range(5)])  # (10, 4): one epoch
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 40, 4))  # every block once
    assert torch.equal(fresh.batch(7, 2), blocks.batch(7, 2))  # no hidden cursor state
    epoch1 = torch.cat([blocks.batch(k, 2) for k in range(5, 10)])
    assert not torch.equal(epoch0, epoch1)  # a new permutation per epoch
    other_seed = torch.cat([TokenBlocks(ids, 4, seed=4).batch(k, 2) for k in range(5)])
    assert not torch.equal(epoch0, other_seed)
    with pytest.raises(ValueError, match="fewer than one block"):
        TokenBlocks(torch.arange(3), seq_len=4)
