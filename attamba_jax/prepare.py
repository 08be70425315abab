"""Tokenize a corpus once into ``.bin`` token files, in worker processes.

    python -m attamba_jax.prepare '.data/gutenberg/books/*.txt' --out .data/gutenberg \\
        --tokenizer .data/gutenberg-32k.model --heldout-fraction 0.01 --workers 16

writes ``PREFIX.train.bin`` and ``PREFIX.heldout.bin`` (``PREFIX.bin`` when nothing is held
out), each with its ``.bin.json`` sidecar, which ``data.train`` / ``data.eval`` then read
memory-mapped. Sources are those of ``data.train`` except ``.bin``; documents keep their
order, and the held-out documents are the ones ``data.heldout_fraction`` would pick.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from attamba_jax.data import DataError, TokenFileWriter, encode_document, expand_sources, is_heldout, iter_documents
from attamba_jax.tokenizer import load_tokenizer

_worker_tokenizer = None


def _init_worker(spec: str):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode(item: tuple[bool, str]):
    held, text = item
    return held, encode_document(_worker_tokenizer, text), len(text.encode("utf-8"))


def prepare(
    sources: Sequence[str],
    out_prefix: str,
    *,
    tokenizer: str = "byte",
    heldout_fraction: float = 0.0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, TokenFileWriter]:
    """Tokenize ``sources`` into ``out_prefix``'s .bin files; returns the closed writers by split."""
    files = expand_sources(sources, "prepare")
    bins = [str(s.path) for s in files if s.kind == "bin"]
    if bins:
        raise DataError(f"prepare: {bins[0]} is already tokenized")
    tok = load_tokenizer(tokenizer)
    if heldout_fraction > 0:
        writers = {
            False: TokenFileWriter(f"{out_prefix}.train.bin", tok),
            True: TokenFileWriter(f"{out_prefix}.heldout.bin", tok),
        }
    else:
        writers = {False: TokenFileWriter(f"{out_prefix}.bin", tok)}
    workers = workers or os.cpu_count() or 1

    def documents():
        for source in files:
            for key, text in iter_documents(source):
                yield is_heldout(key, heldout_fraction), text

    total = len(files) if all(s.kind == "text" for s in files) else None
    bar = tqdm(total=total, unit="doc", disable=not progress, mininterval=1.0)
    start, n_bytes = time.perf_counter(), 0
    # Spawned, not forked: the parent may already run threads (JAX, grain), which fork does not copy.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        for held, tokens, size in pool.imap(_encode, documents(), chunksize=4):
            writers[held].write(tokens)
            n_bytes += size
            bar.update(1)
            bar.set_postfix(
                MB=f"{n_bytes / 1e6:.0f}", tokens=f"{sum(w.num_tokens for w in writers.values()):,}", refresh=False
            )
    bar.close()
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - start
    if not any(w.num_documents for w in writers.values()):
        raise DataError(f"prepare: the sources {list(sources)} hold no documents")
    for w in writers.values():
        print(f"wrote {w.path}: {w.num_documents:,} documents, {w.num_tokens:,} {w.dtype.name} tokens")
    print(
        f"{n_bytes / 1e6:.1f} MB of text in {seconds:.1f} s with {workers} workers ({n_bytes / 1e6 / seconds:.1f} MB/s)"
    )
    return {"heldout" if held else "train": w for held, w in writers.items()}


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="'stdlib', text files, .jsonl files, or globs of them")
    parser.add_argument("--out", required=True, help="output prefix")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a SentencePiece .model (as data.tokenizer)")
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.0, help="share of documents written to PREFIX.heldout.bin"
    )
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.heldout_fraction < 1.0:
        parser.error("--heldout-fraction must be in [0, 1)")
    try:
        prepare(
            args.sources,
            args.out,
            tokenizer=args.tokenizer,
            heldout_fraction=args.heldout_fraction,
            workers=args.workers,
        )
    except (DataError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
