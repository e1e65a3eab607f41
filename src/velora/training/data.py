"""The token stream a run reads: each split tokenized once (cached), cut into blocks of ``seq_len`` ids and read
in a seeded order that is a pure function of the batch index (``TokenBlocks``), and ``load_data``, which builds
corpus, tokenizer and both streams for a run.

Corpora live in ``velora.training.corpus`` and tokenizers in ``velora.training.tokenizer``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# stdlib_* and _stdlib_fingerprint: velora.experiments.common reads the stdlib fingerprint from here
from velora.training.corpus import (  # noqa: F401
    Corpus,
    _stdlib_fingerprint,
    default_cache_dir,
    load_corpus,
    sha256_hex,
    stdlib_files,
    stdlib_root,
)
from velora.training.resume import check_same_data, saved_tokenizer
from velora.training.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from velora.training.config import TrainConfig


def tokenize_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one id stream, each followed by end-of-text. (N_tokens,) int64."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(texts):
        ids.extend(encoded)
        ids.append(tokenizer.eot_id)
    return torch.tensor(ids, dtype=torch.long)


def cached_token_stream(tokenizer, corpus: Corpus, split: str, cache_dir: Path | None = None) -> torch.Tensor:
    """``tokenize_documents`` for one split, cached on disk as safetensors (keyed by corpus + tokenizer)."""
    from safetensors.torch import load_file, save_file

    texts = corpus.train if split == "train" else corpus.validation
    key = sha256_hex(json.dumps({"corpus": corpus.fingerprint, "tok": tokenizer.identity(), "split": split,
                                 "n": len(texts)}, sort_keys=True))[:20]
    path = (cache_dir or default_cache_dir()) / "tokens" / f"{split}-{key}.safetensors"
    if path.exists() and corpus.fingerprint.get("source") != "local":
        return load_file(str(path))["ids"]
    ids = tokenize_documents(tokenizer, texts)
    if corpus.fingerprint.get("source") != "local":  # local files change under the same path: no caching
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"ids": ids}, str(tmp))
        os.replace(tmp, path)
    return ids


class TokenBlocks:
    """A token stream cut into non-overlapping blocks of ``seq_len`` ids, read in a seeded order.

    Batch ``k`` holds the blocks at global positions ``k*B … k*B+B-1``; position ``p`` is block
    ``perm_e[p mod N]`` of epoch ``e = p // N``, where ``perm_e`` is a permutation drawn from a
    generator seeded with (seed, e). The order is therefore a pure function of the batch index:
    resuming at batch ``k`` reads exactly what an uninterrupted run would.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        n_blocks = ids.numel() // seq_len
        if n_blocks < 1:
            raise ValueError(f"the data has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}; "
                             "use more text or a smaller --seq-len")
        self.blocks = ids[: n_blocks * seq_len].view(n_blocks, seq_len)  # (N, T)
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.blocks.numel()

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if not self.shuffle:
                self._perms[epoch] = torch.arange(len(self))
            else:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(len(self), generator=generator)
            for old in [e for e in self._perms if e not in (epoch, epoch - 1)]:
                del self._perms[old]  # keep memory flat over long runs
        return self._perms[epoch]

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        """Batch number ``index`` (0-based). (B, T) int64."""
        positions = range(index * batch_size, (index + 1) * batch_size)
        rows = [int(self._perm(p // len(self))[p % len(self)]) for p in positions]
        return self.blocks[rows]  # (B, T)

    def sequential_batches(self, batch_size: int, max_batches: int | None = None):
        """Validation order: blocks in stream order, whole batches only (at least one)."""
        n = max(1, len(self) // batch_size)
        if max_batches is not None:
            n = min(n, max_batches)
        for i in range(n):
            yield self.blocks[i * batch_size:(i + 1) * batch_size]  # (<=B, T)


# ---- a run's data ---------------------------------------------------------------------------------


@dataclass
class RunData:
    corpus: Corpus
    tokenizer: Any
    train: TokenBlocks
    validation: TokenBlocks


def load_data(config: TrainConfig, cache_dir: Path | None = None, run_folder: Path | None = None,
              allow_data_change: bool = False) -> RunData:
    """Corpus, tokenizer and token streams of a run. With ``run_folder`` (a resume) the run's saved tokenizer is used
    and changed text is refused unless ``allow_data_change`` (see ``velora.training.resume``)."""
    corpus = load_corpus(config.data, config.val_fraction, config.max_train_chars, config.max_val_chars)
    if not corpus.train or not corpus.validation:
        raise ValueError(f"--data {config.data!r} gave an empty train or validation split; add more text")
    tokenizer = None
    if run_folder is not None:
        check_same_data(run_folder, corpus.fingerprint, allow_data_change)
        tokenizer = saved_tokenizer(run_folder)
    if tokenizer is None:
        tokenizer_spec = config.model if config.tokenizer == "model" else config.tokenizer
        tokenizer = load_tokenizer(tokenizer_spec, corpus, config.vocab_size, config.bpe_train_chars, cache_dir)
    train_ids = cached_token_stream(tokenizer, corpus, "train", cache_dir)  # (N_train,)
    val_ids = cached_token_stream(tokenizer, corpus, "validation", cache_dir)  # (N_val,)
    return RunData(corpus, tokenizer, TokenBlocks(train_ids, config.seq_len, seed=config.seed),
                   TokenBlocks(val_ids, config.seq_len, shuffle=False))
