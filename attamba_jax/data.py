"""The input pipeline: sources -> documents -> one token stream -> packed windows -> batches.

Every document becomes ``[BOS] + tokens + [EOS]``; the documents of all sources are
concatenated, in order, into one token stream, and the stream is cut into windows of
``seq_len + 1`` tokens that overlap by one (window i holds inputs ``i*T .. i*T+T-1`` and
their next-token targets). So every token of the stream is an input exactly once per
epoch; the last window is padded.

Alignment (``data.document_align`` = A, resolved by ``Config.document_align``): with A > 1
every document is followed by padding up to the next multiple of A of the stream
(``AlignedStream``); since T is a multiple of A, every document starts at a multiple of A of
its row, or at position 0 when a row cuts it. That is what Attamba's document masking needs
(A = K: a document's chunks are then the row's chunks). Padding is an input nothing real
reads and a target of weight 0, so every real token is still an input, and every counted
target still counted, exactly once per epoch; the cost is (-n mod A) tokens per document of n
tokens (``padding``). The windows are a random-access grain ``MapDataset``:
sharded per process, shuffled with the run's seed (a new order every epoch), repeated,
batched, and read ahead by threads while the device computes. Because each element is a
slice of an array, the iterator's state is a position, and it round-trips through
checkpoints (see ``checkpointing``).

A batch is a dict of [B, T] arrays:
  inputs       int32, the tokens the model reads
  targets      int32, the next token at each position
  weights      float32, 1 where the target counts in the loss: 0 for padding and where the
               target is the BOS of the next document (nothing in a document predicts it)
  segment_ids  int32, 1, 2, ... per document piece within the row (0 = padding), so that a
               loss or an attention mask can keep documents apart (the model reads them with
               ``data.document_masking``: ``pallas_kernels.documents.from_segment_ids``)

Sources (``data.train`` / ``data.eval``):
  ``stdlib``           the Python standard library's own ``.py`` files, one document each
  ``*.jsonl``          one document per line, in its ``text`` field
  ``*.bin``            tokens written by ``python -m attamba_jax.prepare`` (uint16/uint32,
                       memory-mapped) with a ``.bin.json`` sidecar naming the tokenizer
  anything else        a UTF-8 text file is one document (undecodable bytes become U+FFFD)

Held-out split: when ``data.eval`` is empty, a document goes to the held-out set when a hash
of its key (path, or path and line) falls below ``data.heldout_fraction``; the split does not
depend on the order or number of other documents. ``.bin`` files are never split
(``prepare --heldout-fraction`` writes a held-out file instead).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import pathlib
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import grain
import numpy as np

from attamba_jax.config import DataConfig
from attamba_jax.tokenizer import Tokenizer

BIN_FORMAT = "attamba-tokens-v1"


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the source and the problem."""


# --- documents ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """One file of a source list. kind: text | jsonl | bin; key: stable name for the split.

    The key of a file is its name without the directory, so the held-out split does not
    depend on where a corpus is unpacked (the stdlib's: its path below the stdlib root).
    """

    kind: Literal["text", "jsonl", "bin"]
    path: pathlib.Path
    key: str


def stdlib_files() -> list[Source]:
    """The standard library's ``.py`` files (no third-party packages), sorted by relative path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file())
    return [Source("text", p, "stdlib/" + p.relative_to(root).as_posix()) for p in files]


def expand_sources(patterns: Sequence[str], what: str) -> list[Source]:
    """``data.train``-style entries -> the files they name, in order; a pattern matching nothing is an error."""
    out: list[Source] = []
    for pattern in patterns:
        if pattern == "stdlib":
            files = stdlib_files()
            if not files:
                raise DataError(f"{what}: no .py files under {sysconfig.get_paths()['stdlib']}")
            out.extend(files)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if pathlib.Path(m).is_file() and not m.endswith(".bin.json")]
        if not matches:
            raise DataError(f"{what}: {pattern!r} matches no file")
        for m in matches:
            suffix = pathlib.Path(m).suffix
            kind = "bin" if suffix == ".bin" else "jsonl" if suffix == ".jsonl" else "text"
            out.append(Source(kind, pathlib.Path(m), pathlib.Path(m).name))
    return out


def is_heldout(key: str, fraction: float) -> bool:
    """A deterministic, order-independent coin with P(True) = fraction."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


# A text file may hold bytes that are not UTF-8 (they read as U+FFFD); above this share of its
# characters, and at least MIN_UNDECODABLE of them, a warning names it. A NUL byte marks a
# binary file, which is refused.
MAX_UNDECODABLE = 0.01
MIN_UNDECODABLE = 64


class DataWarning(UserWarning):
    """Data that is read, though probably not as meant (named in the message)."""


def decode_text(raw: bytes, name: str) -> str:
    """A text file's bytes as text: Python source (``.py``) in the encoding it declares (PEP 263),
    anything else as UTF-8, invalid bytes as U+FFFD (a DataWarning when more than
    ``MAX_UNDECODABLE`` of the characters, and ``MIN_UNDECODABLE`` at least, are). DataError for
    a binary file (a NUL byte)."""
    if b"\x00" in raw:
        raise DataError(f"{name} is not text: it holds NUL bytes (a binary file?)")
    encoding = "utf-8"
    if name.endswith(".py"):
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        except SyntaxError:  # an unknown or inconsistent declaration: read as UTF-8
            pass
    text = raw.decode(encoding, errors="replace")
    bad = text.count("\ufffd")
    if bad > MAX_UNDECODABLE * len(text) and bad >= MIN_UNDECODABLE:
        message = f"{name}: {bad:,} of its {len(text):,} characters are not {encoding} and read as U+FFFD"
        warnings.warn(message, DataWarning, stacklevel=2)
    return text


def iter_documents(source: Source) -> Iterator[tuple[str, str]]:
    """(key, text) for each non-empty document of a text or JSONL file."""
    if source.kind == "text":
        text = decode_text(source.path.read_bytes(), str(source.path))
        if text:
            yield source.key, text
        return
    if source.kind != "jsonl":
        raise ValueError(f"iter_documents: {source.path} holds tokens, not text")
    with open(source.path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source.path}:{line_no} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{source.path}:{line_no} has no string field 'text'")
            if record["text"]:
                yield f"{source.key}:{line_no}", record["text"]


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``[BOS] + encode(text) + [EOS]`` as int32."""
    ids = tokenizer.encode(text)
    out = np.empty(ids.shape[0] + 2, np.int32)
    out[0], out[1:-1], out[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
    return out


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --- .bin token files -----------------------------------------------------------------------


def sidecar_path(path: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(str(path) + ".json")


class TokenFileWriter:
    """Appends documents' tokens to ``PATH.bin``; ``close()`` writes the ``.bin.json`` sidecar last,
    so a file without its sidecar is known to be incomplete."""

    def __init__(self, path: str | pathlib.Path, tokenizer: Tokenizer):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(self.path).unlink(missing_ok=True)
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.tokenizer = tokenizer
        self._file = open(self.path, "wb")
        self.num_tokens = self.num_documents = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray):
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.num_tokens += int(tokens.size)
        self.num_documents += 1

    def close(self):
        self._file.close()
        meta = {
            "format": BIN_FORMAT,
            "dtype": self.dtype.name,
            "tokenizer": self.tokenizer.identity,
            "vocab_size": self.tokenizer.vocab_size,
            "bos_id": self.tokenizer.bos_id,
            "eos_id": self.tokenizer.eos_id,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "max_token_id": self.max_token_id,
        }
        sidecar_path(self.path).write_text(json.dumps(meta, indent=1) + "\n")


def open_token_file(path: pathlib.Path, tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """Memory-map a ``.bin`` after checking its sidecar against the tokenizer and the model."""
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise DataError(
            f"{path}: no sidecar {meta_path.name}; .bin files are written by `python -m attamba_jax.prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        num_tokens, max_id = int(meta["num_tokens"]), int(meta["max_token_id"])
        if meta["format"] != BIN_FORMAT or dtype not in (np.uint16, np.uint32):
            raise ValueError(f"format {meta['format']!r} dtype {dtype}")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: not a valid token-file sidecar ({e})") from None
    if meta["tokenizer"] != tokenizer.identity:
        raise DataError(
            f"{path} was tokenized with {meta['tokenizer']}, but data.tokenizer is {tokenizer.identity}; "
            "re-run prepare with this tokenizer or set data.tokenizer to the one it used"
        )
    size = path.stat().st_size
    if size != num_tokens * dtype.itemsize:
        raise DataError(
            f"{path} holds {size} bytes, but its sidecar promises {num_tokens} {dtype.name} tokens (truncated or overwritten)"
        )
    if max_id >= vocab_size:
        raise DataError(
            f"{path} holds token id {max_id}, outside the model's vocabulary (model.vocab_size={vocab_size})"
        )
    if num_tokens == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


# --- the token stream and its windows ---------------------------------------------------------


class TokenStream:
    """Token arrays (in memory or memory-mapped) read as one concatenated 1-D stream."""

    align = 1  # documents start anywhere (``AlignedStream``: at multiples of its align)

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [p for p in parts if p.size]
        self.offsets = np.cumsum([0] + [p.size for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start .. stop-1`` as int32 (``0 <= start <= stop <= len``)."""
        out = np.empty(stop - start, np.int32)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            part, base = self.parts[i], int(self.offsets[i])
            n = min(stop, base + part.size) - pos
            out[pos - start : pos - start + n] = part[pos - base : pos - base + n]
            pos += n
            i += 1
        return out


class AlignedStream:
    """A token stream with every document padded (with -1) to a multiple of ``align`` tokens.

    Documents are the runs that start at a BOS token (and a leading run without one); the last
    document is not padded. Reads like ``TokenStream``: ``len`` and ``read(start, stop)``.
    """

    def __init__(self, stream: TokenStream, bos_id: int, align: int):
        self.stream, self.align = stream, align
        bos = [0] + [
            int(off) + np.flatnonzero(np.asarray(part) == bos_id) for off, part in zip(stream.offsets, stream.parts)
        ]
        starts = np.unique(np.concatenate([np.atleast_1d(b) for b in bos])) if len(stream) else np.zeros(0, np.int64)
        self.doc_starts = starts.astype(np.int64)  # in the unpadded stream
        self.doc_lengths = np.diff(np.append(self.doc_starts, len(stream)))
        padded = -(-self.doc_lengths // align) * align
        self.padded_starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        self._len = int(self.padded_starts[-1] + self.doc_lengths[-1]) if len(starts) else 0

    def __len__(self) -> int:
        return self._len

    @property
    def padding(self) -> int:
        """Padding tokens the alignment adds."""
        return self._len - len(self.stream)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Positions ``start .. stop-1`` of the padded stream as int32, -1 on padding."""
        out = np.full(stop - start, -1, np.int32)
        i = int(np.searchsorted(self.padded_starts, start, side="right")) - 1
        while i < len(self.padded_starts) and self.padded_starts[i] < stop:
            base, n = int(self.padded_starts[i]), int(self.doc_lengths[i])
            lo, hi = max(start, base), min(stop, base + n)
            if lo < hi:
                src = int(self.doc_starts[i]) + lo - base
                out[lo - start : hi - start] = self.stream.read(src, src + hi - lo)
            i += 1
        return out


def training_stream(stream: TokenStream, bos_id: int, align: int) -> TokenStream | AlignedStream:
    """The stream the windows are cut from: ``stream`` itself, or aligned to ``align`` (> 1)."""
    return stream if align == 1 else AlignedStream(stream, bos_id, align)


def padding(stream: TokenStream, bos_id: int, align: int) -> dict[str, float]:
    """What aligning ``stream``'s documents to ``align`` costs: documents, tokens, padding, its share."""
    aligned = AlignedStream(stream, bos_id, align)
    docs, pad = len(aligned.doc_starts), aligned.padding
    return {
        "documents": docs,
        "tokens": len(stream),
        "padding": pad,
        "padding_share": pad / max(1, len(aligned)),
        "mean_document": len(stream) / max(1, docs),
    }


class PackedWindows:
    """Window i = tokens ``i*T .. i*T+T`` (T+1 of them) of the stream, padded with -1 at the end.

    A grain random-access data source: ``len`` and ``__getitem__`` only.
    """

    def __init__(self, stream: TokenStream | AlignedStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self._len = max(0, math.ceil((len(stream) - 1) / seq_len))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        t = self.seq_len
        start = index * t
        stop = min(start + t + 1, len(self.stream))
        window = np.full(t + 1, -1, np.int32)
        window[: stop - start] = self.stream.read(start, stop)
        return window


def make_batch(windows: np.ndarray, *, bos_id: int, vocab_size: int, align: int = 1) -> dict[str, np.ndarray]:
    """[B, T+1] windows (-1 = padding) -> inputs, targets, weights, segment_ids, each [B, T].

    ``align``: every document must start at a multiple of it (the windows of an ``AlignedStream``).
    """
    top = int(windows.max(initial=-1))
    if top >= vocab_size:
        raise DataError(f"token id {top} is outside the model's vocabulary (model.vocab_size={vocab_size})")
    inputs, targets = windows[:, :-1], windows[:, 1:]
    is_bos = inputs == bos_id
    if align > 1:
        row, pos = np.nonzero(is_bos)
        misaligned = pos % align != 0
        if misaligned.any():
            raise DataError(
                f"a document starts at position {int(pos[misaligned][0])} of a row, not a multiple of "
                f"data.document_align={align} (BOS token {bos_id} inside a document?)"
            )
    # A row that starts inside a document gives that piece its own id.
    segments = np.cumsum(is_bos, axis=1, dtype=np.int32) + (~is_bos[:, :1]).astype(np.int32)
    return {
        "inputs": np.maximum(inputs, 0),
        "targets": np.maximum(targets, 0),
        "weights": ((targets >= 0) & (targets != bos_id)).astype(np.float32),
        "segment_ids": np.where(inputs >= 0, segments, 0).astype(np.int32),
    }


# --- building the pipeline --------------------------------------------------------------------


def _load_streams(
    patterns: Sequence[str], tokenizer: Tokenizer, vocab_size: int, heldout_fraction: float, what: str
) -> tuple[TokenStream, TokenStream]:
    """One pass over the sources: (documents kept for training, documents held out).

    Text and JSONL documents are tokenized in memory; .bin files are memory-mapped and
    always train. ``heldout_fraction = 0`` keeps everything for training.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    pending: dict[bool, list[np.ndarray]] = {False: [], True: []}

    def flush():
        for held in (False, True):
            if pending[held]:
                parts[held].append(np.concatenate(pending[held]).astype(dtype))
                pending[held] = []

    for source in expand_sources(patterns, what):
        if source.kind == "bin":
            flush()  # keep the order of the sources in the stream
            parts[False].append(open_token_file(source.path, tokenizer, vocab_size))
            continue
        for key, text in iter_documents(source):
            pending[is_heldout(key, heldout_fraction)].append(encode_document(tokenizer, text))
    flush()
    return TokenStream(parts[False]), TokenStream(parts[True])


@dataclasses.dataclass
class Corpus:
    """The training stream and the held-out stream (None when nothing is held out), both aligned alike."""

    train: TokenStream | AlignedStream
    heldout: TokenStream | AlignedStream | None


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer, vocab_size: int, align: int = 1) -> Corpus:
    """The training and held-out token streams that ``cfg`` describes, their documents starting at
    multiples of ``align`` (``Config.document_align``)."""
    fraction = 0.0 if cfg.eval else cfg.heldout_fraction
    train, heldout = _load_streams(cfg.train, tokenizer, vocab_size, fraction, "data.train")
    if cfg.eval:
        heldout, _ = _load_streams(cfg.eval, tokenizer, vocab_size, 0.0, "data.eval")
        if len(heldout) == 0:
            raise DataError(f"data.eval: the sources {list(cfg.eval)} hold no documents")
    if len(train) == 0:
        raise DataError(f"data.train: the sources {list(cfg.train)} hold no training documents")
    aligned = lambda stream: training_stream(stream, tokenizer.bos_id, align)
    return Corpus(aligned(train), aligned(heldout) if len(heldout) else None)


def _local_batch(cfg: DataConfig, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise DataError(
            f"data.batch_size ({cfg.batch_size}) must be a multiple of the number of processes ({process_count})"
        )
    return cfg.batch_size // process_count


def train_dataset(
    cfg: DataConfig,
    stream: TokenStream | AlignedStream,
    *,
    seed: int,
    bos_id: int,
    vocab_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """This process's endless, shuffled stream of training batches (reshuffled every epoch).

    The windows are shuffled as one sequence for all processes and dealt out in turn, so global
    batch i holds windows i·B .. (i+1)·B - 1 of that order whatever the number of processes: a
    run on several processes trains on the batches of a run on one.
    """
    local = _local_batch(cfg, process_count)
    windows = grain.MapDataset.source(PackedWindows(stream, cfg.seq_len))
    if len(windows) < cfg.batch_size:
        raise DataError(
            f"data.train: {len(stream)} tokens make {len(windows)} windows of seq_len {cfg.seq_len}, "
            f"fewer than one batch ({cfg.batch_size}); add data or lower data.seq_len / data.batch_size"
        )
    ds = windows.shuffle(seed=seed).repeat(None)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.batch(local, drop_remainder=True)
    ds = ds.map(functools.partial(_batch_from_windows, bos_id=bos_id, vocab_size=vocab_size, align=stream.align))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.threads, prefetch_buffer_size=cfg.prefetch))


def epoch_windows(
    cfg: DataConfig, stream: TokenStream | AlignedStream, *, process_index: int = 0, process_count: int = 1
) -> int:
    """Windows per epoch on this process (to turn a step count into epochs)."""
    return len(PackedWindows(stream, cfg.seq_len)) // process_count


def eval_dataset(
    cfg: DataConfig,
    stream: TokenStream | AlignedStream,
    *,
    bos_id: int,
    vocab_size: int,
    max_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The held-out windows in order, as full batches (the last padded with weight-0 rows).

    Every process gets the same number of batches, so a multi-process evaluation stays in step.
    """
    local = _local_batch(cfg, process_count)
    all_windows = PackedWindows(stream, cfg.seq_len)
    n_batches = math.ceil(math.ceil(len(all_windows) / process_count) / local)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    windows = grain.MapDataset.source(all_windows)[process_index::process_count]
    pad = np.full(cfg.seq_len + 1, -1, np.int32)

    def read_batch(i: int) -> dict[str, np.ndarray]:
        rows = [windows[j] if j < len(windows) else pad for j in range(i * local, (i + 1) * local)]
        return _batch_from_windows(np.stack(rows), bos_id=bos_id, vocab_size=vocab_size, align=stream.align)

    return grain.MapDataset.range(n_batches).map(read_batch)


def _batch_from_windows(windows, *, bos_id: int, vocab_size: int, align: int):
    return make_batch(np.asarray(windows), bos_id=bos_id, vocab_size=vocab_size, align=align)
