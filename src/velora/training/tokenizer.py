"""Tokenizers a run can use, by spec (``load_tokenizer``): ``bpe`` (byte-level BPE trained locally on the train
split with `tokenizers`, cached), ``byte`` (256 byte ids + end-of-text), a path to a ``tokenizer.json``, or a
local/hub model directory whose own tokenizer is used."""

from __future__ import annotations

import json
import os
from pathlib import Path

from velora.training.corpus import Corpus, default_cache_dir, sha256_hex, take_until

EOT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text = 256."""

    name = "byte"

    def __init__(self) -> None:
        self.eot_id = 256
        self.vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_str(self) -> str:
        return json.dumps({"velora_tokenizer": "byte"})

    def identity(self) -> str:
        return "byte"


class BPETokenizer:
    """A `tokenizers` byte-level BPE (trained locally or loaded from a tokenizer.json)."""

    def __init__(self, tokenizer, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer {name!r} has no {EOT!r} token; train it with velora or use --tokenizer byte")
        self.eot_id = eot
        self.vocab_size = tokenizer.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def to_str(self) -> str:
        """The tokenizer.json text (the run folder writes it atomically as ``tokenizer.json``)."""
        return self._tok.to_str()

    def identity(self) -> str:
        return sha256_hex(self._tok.to_str())[:16]


class PretrainedTokenizer:
    """The own tokenizer of a local/hub model (transformers AutoTokenizer)."""

    def __init__(self, tokenizer, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        self.eot_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.vocab_size = len(tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def to_str(self) -> str:
        return json.dumps({"velora_tokenizer": "pretrained", "name": self.name})

    def identity(self) -> str:
        return "pretrained:" + self.name


def train_bpe(texts: list[str], vocab_size: int, max_chars: int):
    """Train a byte-level BPE on at most ``max_chars`` characters of ``texts`` (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use >= 258 or --tokenizer byte")
    sample = take_until([("", t) for t in texts], max_chars)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((t for _, t in sample), trainer=trainer)
    return tokenizer


def bpe_cache_path(corpus: Corpus, vocab_size: int, max_chars: int, cache_dir: Path | None = None) -> Path:
    key = sha256_hex(json.dumps({"corpus": corpus.fingerprint, "vocab": vocab_size, "chars": max_chars,
                                 "version": 1}, sort_keys=True))[:20]
    return (cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"


def load_tokenizer(spec: str, corpus: Corpus | None = None, vocab_size: int = 2048, bpe_train_chars: int = 1_000_000,
                   cache_dir: Path | None = None):
    """A tokenizer by spec (see the module docstring). ``bpe`` is trained on ``corpus.train`` once and then
    read back from the cache (keyed by the corpus fingerprint, vocab size and training-text cap)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if corpus is None:
            raise ValueError("tokenizer 'bpe' needs a corpus to train on")
        from tokenizers import Tokenizer

        path = bpe_cache_path(corpus, vocab_size, bpe_train_chars, cache_dir)
        if path.exists():
            return BPETokenizer(Tokenizer.from_file(str(path)), f"bpe-{vocab_size}")
        tokenizer = train_bpe(corpus.train, vocab_size, bpe_train_chars)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        return BPETokenizer(tokenizer, f"bpe-{vocab_size}")
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        if data.get("velora_tokenizer") == "byte":
            return ByteTokenizer()
        if data.get("velora_tokenizer") == "pretrained":
            return load_tokenizer(data["name"])
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(path)), path.stem)
    try:
        from transformers import AutoTokenizer

        return PretrainedTokenizer(AutoTokenizer.from_pretrained(spec), spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer {spec!r} is neither 'bpe', 'byte', a tokenizer.json nor a loadable model "
                         f"directory/hub name ({type(err).__name__}); pick one of those") from None
