"""Corpora, tokenizers and the token stream the training loop reads.

The offline default corpus is the running Python's own standard-library source, read at run time
(nothing is copied into the repository). Documents are split into train/validation by a hash of
their path, so the split is the same on every machine with the same stdlib, and every result
records a fingerprint (Python version + hash of the file list) saying exactly which text it saw.

Corpus specs accepted by ``load_corpus``:
    stdlib              Python source of the standard library (code domain)
    stdlib-docs         docstrings and comments of the same files (a second, prose-like domain)
    <path>              a local text file or a folder of text files
    hf:<name>[:<config>][:<split>]   a Hugging Face ``datasets`` dataset (needs `pip install datasets`)

Tokenizer specs accepted by ``load_tokenizer``: ``bpe`` (byte-level BPE trained locally on the
train split with `tokenizers`, cached), ``byte`` (256 byte ids + end-of-text), a path to a
``tokenizer.json``, or a local/hub model directory whose own tokenizer is used.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

EOT = "<|endoftext|>"
# folders of the stdlib that are not ordinary library code: third-party installs, the huge test
# suite, codec tables and the generated pydoc topic dump
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
                                  "encodings", "pydoc_data", "lib2to3", "turtledemo", "config-3.11"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tsv", ".html", ".xml",
                           ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".toml", ".yaml", ".yml",
                           ".tex", ".ini", ".cfg", ".sh"})
LOCAL_PIECE_LINES = 50  # local files are cut into pieces of this many lines before the hash split ...
LOCAL_PIECE_CHARS = 8192  # ... or of this many characters, whichever comes first (a long line is cut too)


def default_cache_dir() -> Path:
    root = os.environ.get("VELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velora")
    return Path(root)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for a document key (first 8 bytes of its sha256)."""
    return int(_sha256(key)[:16], 16) / 2.0**64


def split_of(key: str, val_fraction: float) -> str:
    return "validation" if hash_fraction(key) < val_fraction else "train"


# ---- corpora -------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Train and validation documents plus the fingerprint saying which text they are."""

    name: str
    train: list[str]
    validation: list[str]
    fingerprint: dict = field(default_factory=dict)

    def train_chars(self) -> int:
        return sum(len(t) for t in self.train)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the stdlib's ``.py`` files, sorted (platform-independent separators)."""
    root = root or stdlib_root()
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(".py"):
                paths.append(Path(directory, name).relative_to(root).as_posix())
    if not paths:
        raise ValueError(f"found no .py files under the standard library at {root}; pass --data <path> instead")
    return sorted(paths)


def _stdlib_fingerprint(root: Path, paths: list[str]) -> str:
    # the file list plus each file's size: a patched stdlib gives a different fingerprint
    listing = "\n".join(f"{p}\t{(root / p).stat().st_size}" for p in paths)
    return _sha256(listing)


def docstrings_and_comments(source: str) -> str:
    """The prose of a Python file: its docstrings (module, class, function) and ``#`` comments."""
    pieces = []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    pieces.append(doc)
    comment_block: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            comment_block.append(stripped.lstrip("#").strip())
        elif comment_block:
            pieces.append(" ".join(comment_block))
            comment_block = []
    if comment_block:
        pieces.append(" ".join(comment_block))
    return "\n\n".join(p for p in pieces if p)


def _take_until(keyed_texts: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    if max_chars is None:
        return keyed_texts
    out, total = [], 0
    for key, text in keyed_texts:
        if total >= max_chars:
            break
        out.append((key, text[: max_chars - total]))
        total += len(out[-1][1])
    return out


def load_stdlib(kind: str = "code", val_fraction: float = 0.05, max_train_chars: int | None = None,
                max_val_chars: int | None = None) -> Corpus:
    """The standard-library corpus. Files go to validation when their path hash < ``val_fraction``;
    within a split, files are taken in hash order (a fixed shuffle) until the character caps."""
    if kind not in ("code", "docs"):
        raise ValueError(f"stdlib corpus kind={kind!r} is unknown; use 'code' or 'docs'")
    root = stdlib_root()
    paths = stdlib_files(root)
    ordered = sorted(paths, key=lambda p: _sha256("order:" + p))
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for path in ordered:
        splits[split_of(path, val_fraction)].append(path)
    caps = {"train": max_train_chars, "validation": max_val_chars}
    texts: dict[str, list[str]] = {}
    for split, split_paths in splits.items():
        out, total, cap = [], 0, caps[split]
        for path in split_paths:
            if cap is not None and total >= cap:
                break
            source = (root / path).read_text(encoding="utf-8", errors="replace")
            text = source if kind == "code" else docstrings_and_comments(source)
            if not text.strip():
                continue
            if cap is not None:
                text = text[: cap - total]
            out.append(text)
            total += len(text)
        texts[split] = out
    fingerprint = {
        "source": "python-stdlib-" + kind,
        "python": platform.python_version(),
        "stdlib_root": str(root),
        "files_sha256": _stdlib_fingerprint(root, paths),
        "n_files": len(paths),
        "n_validation_files": len(splits["validation"]),
        "val_fraction": val_fraction,
        "max_train_chars": max_train_chars,
        "max_val_chars": max_val_chars,
        "train_chars": sum(len(t) for t in texts["train"]),
        "validation_chars": sum(len(t) for t in texts["validation"]),
    }
    return Corpus("stdlib" if kind == "code" else "stdlib-docs", texts["train"], texts["validation"], fingerprint)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"--data folder {str(path)!r} holds no text files (suffixes {sorted(TEXT_SUFFIXES)})")
    return files


def text_pieces(text: str) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``LOCAL_PIECE_LINES`` lines and ``LOCAL_PIECE_CHARS``
    characters; a longer line is cut at the character limit. ``"".join(pieces) == text``."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > LOCAL_PIECE_CHARS - size:  # the line overflows this piece: fill it, start the next
            current.append(line[: LOCAL_PIECE_CHARS - size])
            line = line[LOCAL_PIECE_CHARS - size:]
            pieces.append("".join(current))
            current, size = [], 0
        if line:
            current.append(line)
            size += len(line)
        if len(current) == LOCAL_PIECE_LINES or size == LOCAL_PIECE_CHARS:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def load_local(path: str | Path, val_fraction: float = 0.05, max_train_chars: int | None = None,
               max_val_chars: int | None = None) -> Corpus:
    """A local text file or folder. Files are cut into pieces of ``LOCAL_PIECE_LINES`` lines or
    ``LOCAL_PIECE_CHARS`` characters (``text_pieces``), keyed by (relative path, piece index) and split by key
    hash; if that leaves validation empty, the last piece goes to validation so a single small file still has
    something to evaluate on."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist; pass a text file, a folder, 'stdlib' or "
                                "'hf:<dataset>'")
    files = _local_files(root)
    pieces: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    for file in files:
        raw = file.read_bytes()
        digest.update(file.name.encode() + b"\0" + raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--data file {str(file)!r} is not UTF-8 text; convert it or remove it") from None
        rel = file.name if root.is_file() else file.relative_to(root).as_posix()
        for index, piece in enumerate(text_pieces(text)):
            if piece.strip():
                pieces.append((f"{rel}#{index}", piece))
    if len(pieces) < 2:
        chars = sum(len(t) for _, t in pieces)
        raise ValueError(f"--data {str(path)!r} has too little text ({chars} characters; need more than "
                         f"{LOCAL_PIECE_CHARS} characters or {LOCAL_PIECE_LINES} lines, so train and validation "
                         "are both non-empty); add text")
    train = [(k, t) for k, t in pieces if split_of(k, val_fraction) == "train"]
    validation = [(k, t) for k, t in pieces if split_of(k, val_fraction) == "validation"]
    if not validation:
        validation, train = [train[-1]], train[:-1]
    if not train:
        train, validation = validation[:-1], validation[-1:]
    train, validation = _take_until(train, max_train_chars), _take_until(validation, max_val_chars)
    fingerprint = {
        "source": "local",
        "path": str(root.resolve()),
        "content_sha256": digest.hexdigest(),
        "n_files": len(files),
        "n_pieces": len(pieces),
        "val_fraction": val_fraction,
        "train_chars": sum(len(t) for _, t in train),
        "validation_chars": sum(len(t) for _, t in validation),
    }
    return Corpus(root.name, [t for _, t in train], [t for _, t in validation], fingerprint)


def load_hf(spec: str, val_fraction: float = 0.05, max_train_chars: int | None = None,
            max_val_chars: int | None = None) -> Corpus:
    """``hf:<name>[:<config>][:<split>]``. Uses the dataset's own validation split when it has one,
    otherwise a hash split of row indices. The text column is ``text`` or the first string column."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {spec!r} needs the Hugging Face `datasets` package; `pip install datasets` "
                         "or pass a local text file/folder") from None
    parts = spec[len("hf:"):].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else "train"
    if not name:
        raise ValueError(f"--data {spec!r} names no dataset; use hf:<name>[:<config>][:<split>]")
    train_rows = datasets.load_dataset(name, config, split=split)
    column = _text_column(train_rows, spec)
    val_rows = None
    for candidate in ("validation", "valid", "test"):
        if candidate != split:
            try:
                val_rows = datasets.load_dataset(name, config, split=candidate)
                break
            except (ValueError, KeyError):
                continue
    if val_rows is not None:
        train = [(str(i), t) for i, t in enumerate(train_rows[column]) if t]
        validation = [(str(i), t) for i, t in enumerate(val_rows[column]) if t]
    else:
        rows = [(str(i), t) for i, t in enumerate(train_rows[column]) if t]
        train = [r for r in rows if split_of(f"{name}:{r[0]}", val_fraction) == "train"]
        validation = [r for r in rows if split_of(f"{name}:{r[0]}", val_fraction) == "validation"]
    train, validation = _take_until(train, max_train_chars), _take_until(validation, max_val_chars)
    fingerprint = {
        "source": "huggingface",
        "dataset": name,
        "config": config,
        "split": split,
        "fingerprint": getattr(train_rows, "_fingerprint", None),
        "train_chars": sum(len(t) for _, t in train),
        "validation_chars": sum(len(t) for _, t in validation),
    }
    return Corpus(name, [t for _, t in train], [t for _, t in validation], fingerprint)


def _text_column(rows, spec: str) -> str:
    features = rows.features
    if "text" in features:
        return "text"
    for column, feature in features.items():
        if getattr(feature, "dtype", None) == "string":
            return column
    raise ValueError(f"--data {spec!r} has no string column (columns: {list(features)}); pick another dataset")


def load_corpus(spec: str, val_fraction: float = 0.05, max_train_chars: int | None = None,
                max_val_chars: int | None = None) -> Corpus:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    caps = dict(val_fraction=val_fraction, max_train_chars=max_train_chars, max_val_chars=max_val_chars)
    if spec == "stdlib":
        return load_stdlib("code", **caps)
    if spec == "stdlib-docs":
        return load_stdlib("docs", **caps)
    if spec.startswith("hf:"):
        return load_hf(spec, **caps)
    return load_local(spec, **caps)


# ---- tokenizers ----------------------------------------------------------------------------------


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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

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
        """The tokenizer.json text (what ``save`` writes; the run folder writes it atomically)."""
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

    def identity(self) -> str:
        return _sha256(self._tok.to_str())[:16]


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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

    def identity(self) -> str:
        return "pretrained:" + self.name


def train_bpe(texts: list[str], vocab_size: int, max_chars: int):
    """Train a byte-level BPE on at most ``max_chars`` characters of ``texts`` (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use >= 258 or --tokenizer byte")
    sample = _take_until([("", t) for t in texts], max_chars)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((t for _, t in sample), trainer=trainer)
    return tokenizer


def bpe_cache_path(corpus: Corpus, vocab_size: int, max_chars: int, cache_dir: Path | None = None) -> Path:
    key = _sha256(json.dumps({"corpus": corpus.fingerprint, "vocab": vocab_size, "chars": max_chars,
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


# ---- token stream ---------------------------------------------------------------------------------


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
    key = _sha256(json.dumps({"corpus": corpus.fingerprint, "tok": tokenizer.identity(), "split": split,
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

    def epoch_of(self, index: int, batch_size: int) -> float:
        return index * batch_size / len(self)

    def sequential_batches(self, batch_size: int, max_batches: int | None = None):
        """Validation order: blocks in stream order, whole batches only (at least one)."""
        n = max(1, len(self) // batch_size)
        if max_batches is not None:
            n = min(n, max_batches)
        for i in range(n):
            yield self.blocks[i * batch_size:(i + 1) * batch_size]  # (<=B, T)
