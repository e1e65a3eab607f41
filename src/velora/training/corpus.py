"""Corpora: the train and validation documents a run reads, and the fingerprint saying which text they are.

The offline default corpus is the running Python's own standard-library source, read at run time
(nothing is copied into the repository). Documents are split into train/validation by a hash of
their path, so the split is the same on every machine with the same stdlib, and every result
records a fingerprint (Python version + hash of the file list) saying exactly which text it saw.

Corpus specs accepted by ``load_corpus``:
    stdlib              Python source of the standard library (code domain)
    stdlib-docs         docstrings and comments of the same files (a second, prose-like domain)
    <path>              a local text file or a folder of text files
    hf:<name>[:<config>][:<split>]   a Hugging Face ``datasets`` dataset (needs `pip install datasets`)
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

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
    """Where tokenizers and token streams are cached: ``$VELORA_CACHE`` or ``~/.cache/velora``."""
    root = os.environ.get("VELORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velora")
    return Path(root)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for a document key (first 8 bytes of its sha256)."""
    return int(sha256_hex(key)[:16], 16) / 2.0**64


def split_of(key: str, val_fraction: float) -> str:
    return "validation" if hash_fraction(key) < val_fraction else "train"


@dataclass
class Corpus:
    """Train and validation documents plus the fingerprint saying which text they are."""

    name: str
    train: list[str]
    validation: list[str]
    fingerprint: dict = field(default_factory=dict)


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
    return sha256_hex(listing)


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


def take_until(keyed_texts: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
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
    ordered = sorted(paths, key=lambda p: sha256_hex("order:" + p))
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
    train, validation = take_until(train, max_train_chars), take_until(validation, max_val_chars)
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
    train, validation = take_until(train, max_train_chars), take_until(validation, max_val_chars)
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
