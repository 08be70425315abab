"""The input pipeline: sources, packing, shuffling, sharding, iterator state, .bin files, errors."""

import json

import numpy as np
import pytest

from attamba_jax import data
from attamba_jax.config import DataConfig
from attamba_jax.prepare import main as prepare_main
from attamba_jax.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
BOS, EOS, VOCAB = BYTE.bos_id, BYTE.eos_id, BYTE.vocab_size


def _write_docs(root, n=12, seed=0):
    """n small text files with distinct contents; returns their texts in path order."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        text = f"doc {i}: " + "".join(rng.choice(list("abcdefgh \n"), size=int(rng.integers(20, 90))))
        (root / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    return texts


def _stream_of(texts):
    return np.concatenate([data.encode_document(BYTE, t) for t in texts])


def _cfg(root, **kw):
    return DataConfig(
        **{
            "train": (str(root / "*.txt"),),
            "heldout_fraction": 0.0,
            "seq_len": 16,
            "batch_size": 4,
            "threads": 2,
            "prefetch": 2,
            **kw,
        }
    )


def test_documents_are_framed_and_concatenated_in_order(tmp_path):
    texts = _write_docs(tmp_path)
    corpus = data.load_corpus(_cfg(tmp_path), BYTE, VOCAB)
    stream = corpus.train.read(0, len(corpus.train))
    np.testing.assert_array_equal(stream, _stream_of(texts))
    assert corpus.heldout is None
    assert (stream == BOS).sum() == (stream == EOS).sum() == len(texts)


def test_packing_covers_every_token_exactly_once_per_epoch(tmp_path):
    texts = _write_docs(tmp_path)
    stream = _stream_of(texts)
    windows = data.PackedWindows(data.TokenStream([stream]), seq_len=16)
    raw = np.stack([windows[i] for i in range(len(windows))])
    batch = data.make_batch(raw, bos_id=BOS, vocab_size=VOCAB)
    real = raw[:, 1:] >= 0  # positions whose target is a token of the stream
    # In window order, every token that has a next token is an input exactly once, with it as target.
    np.testing.assert_array_equal(batch["inputs"][real], stream[:-1])
    np.testing.assert_array_equal(batch["targets"][real], stream[1:])
    # Only the last window is padded, and only at its end.
    assert real[:-1].all() and not real[-1, -1]
    assert ((batch["segment_ids"] > 0) >= real).all()
    # The loss skips padding and the EOS -> next-BOS transitions, nothing else.
    expected = np.zeros_like(batch["weights"], dtype=bool)
    expected[real] = stream[1:] != BOS
    np.testing.assert_array_equal(batch["weights"].astype(bool), expected)


@pytest.mark.parametrize("align", [4, 8])
def test_aligned_packing_starts_documents_on_the_grid_and_trains_every_token_once(tmp_path, align):
    # Given documents aligned to `align` and rows of 16 tokens (a multiple of it)
    texts = _write_docs(tmp_path, n=20, seed=align)
    stream = _stream_of(texts)
    corpus = data.load_corpus(_cfg(tmp_path), BYTE, VOCAB, align=align)
    assert isinstance(corpus.train, data.AlignedStream) and corpus.train.align == align
    windows = data.PackedWindows(corpus.train, seq_len=16)
    raw = np.stack([windows[i] for i in range(len(windows))])
    batch = data.make_batch(raw, bos_id=BOS, vocab_size=VOCAB, align=align)
    inputs = raw[:, :-1]
    # Then every document starts at a multiple of `align` of its row, and padding follows documents only
    rows, cols = np.nonzero(inputs == BOS)
    assert len(rows) == len(texts) and (cols % align == 0).all()
    padded = corpus.train.read(0, len(corpus.train))
    docs = np.split(padded, np.flatnonzero(padded == BOS)[1:])
    for doc, text in zip(docs, texts):
        want = data.encode_document(BYTE, text)
        np.testing.assert_array_equal(doc[: len(want)], want)
        assert (doc[len(want) :] == -1).all() and len(doc) - len(want) < align
    assert corpus.train.padding == sum(-len(data.encode_document(BYTE, t)) % align for t in texts[:-1])
    # And every real token is an input exactly once, every counted target is the stream's next token
    real_in = inputs >= 0
    np.testing.assert_array_equal(batch["inputs"][real_in], stream)
    counted = batch["weights"] > 0
    assert not (counted & ~real_in).any() and not (counted & (raw[:, 1:] < 0)).any()
    expected_targets = stream[1:][stream[1:] != BOS]  # the targets the unaligned stream counts
    np.testing.assert_array_equal(batch["targets"][counted], expected_targets)
    # And the model reads padding as part of the document before it
    assert (batch["segment_ids"][~real_in] == 0).all()


def test_padding_report(tmp_path):
    texts = _write_docs(tmp_path, n=5)
    corpus = data.load_corpus(_cfg(tmp_path), BYTE, VOCAB)
    report = data.padding(corpus.train, BOS, 8)
    lengths = [len(data.encode_document(BYTE, t)) for t in texts]
    assert report["documents"] == 5 and report["tokens"] == sum(lengths)
    assert report["padding"] == sum(-n % 8 for n in lengths[:-1])


def test_misaligned_document_is_refused():
    row = np.array([[BOS, 5, EOS, -1, -1, BOS, 6, EOS, -1]], np.int32)
    with pytest.raises(data.DataError, match="document starts at position 5 of a row, not a multiple of"):
        data.make_batch(row, bos_id=BOS, vocab_size=VOCAB, align=4)


def test_segment_ids_number_document_pieces_within_a_row():
    row = np.array([[7, 7, EOS, BOS, 5, EOS, BOS, 6, 6, -1, -1]], np.int32)  # starts mid-document
    b = data.make_batch(row, bos_id=BOS, vocab_size=VOCAB)
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 3, 3, 0])
    np.testing.assert_array_equal(b["weights"][0], [1, 1, 0, 1, 1, 0, 1, 1, 0, 0])
    row[0, 0] = BOS
    np.testing.assert_array_equal(
        data.make_batch(row, bos_id=BOS, vocab_size=VOCAB)["segment_ids"][0, :4], [1, 1, 1, 2]
    )


def _epoch_rows(ds_iter, n_batches):
    return [tuple(r) for _ in range(n_batches) for r in next(ds_iter)["inputs"]]


def test_shuffled_epochs_are_permutations_and_differ(tmp_path):
    texts = _write_docs(tmp_path)
    cfg = _cfg(tmp_path)
    stream = data.TokenStream([_stream_of(texts)])
    n = data.epoch_windows(cfg, stream)
    batch_size = next(b for b in (8, 7, 6, 5, 4, 3, 2) if n % b == 0)  # whole batches per epoch
    cfg = _cfg(tmp_path, batch_size=batch_size)
    windows = data.PackedWindows(stream, 16)
    all_rows = sorted(tuple(np.maximum(windows[i][:-1], 0)) for i in range(n))
    it = iter(data.train_dataset(cfg, stream, seed=3, bos_id=BOS, vocab_size=VOCAB))
    per_epoch = n // cfg.batch_size
    first, second = _epoch_rows(it, per_epoch), _epoch_rows(it, per_epoch)
    assert sorted(first) == all_rows and sorted(second) == all_rows
    assert first != second  # reshuffled
    same_seed = iter(data.train_dataset(cfg, stream, seed=3, bos_id=BOS, vocab_size=VOCAB))
    assert _epoch_rows(same_seed, per_epoch) == first
    other_seed = iter(data.train_dataset(cfg, stream, seed=4, bos_id=BOS, vocab_size=VOCAB))
    assert _epoch_rows(other_seed, per_epoch) != first


def test_two_processes_read_between_them_the_batches_of_one(tmp_path):
    # Given one process's batches of 4 and two processes' batches of 2, same seed
    texts = _write_docs(tmp_path, n=16)
    stream = data.TokenStream([_stream_of(texts)])
    cfg = _cfg(tmp_path, batch_size=4)
    make = lambda **shard: iter(data.train_dataset(cfg, stream, seed=0, bos_id=BOS, vocab_size=VOCAB, **shard))
    one = make()
    two = [make(process_index=p, process_count=2) for p in range(2)]
    rows = lambda it: [tuple(r) for r in next(it)["inputs"]]
    # Then, batch by batch over two epochs, the two processes hold disjoint halves of the one batch
    batches = 2 * data.epoch_windows(cfg, stream) // 4 + 1
    for _ in range(batches):
        whole, first, second = rows(one), rows(two[0]), rows(two[1])
        assert len(first) == len(second) == 2
        assert sorted(first + second) == sorted(whole)


def test_iterator_state_round_trips(tmp_path):
    stream = data.TokenStream([_stream_of(_write_docs(tmp_path))])
    cfg = _cfg(tmp_path)
    it = iter(data.train_dataset(cfg, stream, seed=1, bos_id=BOS, vocab_size=VOCAB))
    for _ in range(7):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(5)]
    resumed = iter(data.train_dataset(cfg, stream, seed=1, bos_id=BOS, vocab_size=VOCAB))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_jsonl_and_text_sources_and_heldout_split(tmp_path):
    texts = _write_docs(tmp_path, n=40)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    (tmp_path / "all.jsonl").write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    cfg = DataConfig(train=(str(tmp_path / "all.jsonl"),), heldout_fraction=0.3, seq_len=16, batch_size=4)
    corpus = data.load_corpus(cfg, BYTE, VOCAB)
    keys = [f"all.jsonl:{i + 1 + (i >= 20)}" for i in range(40)]  # the blank line shifts numbering
    held = [t for k, t in zip(keys, texts) if data.is_heldout(k, 0.3)]
    kept = [t for k, t in zip(keys, texts) if not data.is_heldout(k, 0.3)]
    assert 0 < len(held) < 40
    np.testing.assert_array_equal(corpus.train.read(0, len(corpus.train)), _stream_of(kept))
    np.testing.assert_array_equal(corpus.heldout.read(0, len(corpus.heldout)), _stream_of(held))
    # Explicit eval sources replace the split.
    cfg = DataConfig(
        train=(str(tmp_path / "doc0*.txt"),), eval=(str(tmp_path / "doc1*.txt"),), seq_len=16, batch_size=4
    )
    corpus = data.load_corpus(cfg, BYTE, VOCAB)
    np.testing.assert_array_equal(corpus.heldout.read(0, len(corpus.heldout)), _stream_of(texts[10:20]))


def test_heldout_split_does_not_depend_on_the_directory(tmp_path):
    # Given the same books unpacked in two places, the same books are held out.
    for where in ("a", "b/deeper"):
        (tmp_path / where).mkdir(parents=True)
    texts = _write_docs(tmp_path / "a", n=60)
    _write_docs(tmp_path / "b" / "deeper", n=60)
    held = {
        where: [data.is_heldout(f.key, 0.2) for f in data.expand_sources([str(tmp_path / where / "doc*.txt")], "x")]
        for where in ("a", "b/deeper")
    }
    assert held["a"] == held["b/deeper"] and 0 < sum(held["a"]) < len(texts)


def test_stdlib_corpus_is_found_and_split_deterministically():
    files = data.expand_sources(["stdlib"], "data.train")
    assert len(files) > 100 and all(f.path.suffix == ".py" and f.key.startswith("stdlib/") for f in files)
    assert [f.key for f in files] == sorted(f.key for f in files)
    held = [f.key for f in files if data.is_heldout(f.key, 0.02)]
    assert 0 < len(held) < 0.1 * len(files)
    assert held == [f.key for f in data.expand_sources(["stdlib"], "x") if data.is_heldout(f.key, 0.02)]


def test_prepared_bin_files_read_back_as_the_same_stream(tmp_path):
    _write_docs(tmp_path, n=30)
    prepare_main(
        [str(tmp_path / "*.txt"), "--out", str(tmp_path / "out" / "c"), "--heldout-fraction", "0.25", "--workers", "2"]
    )
    meta = json.loads((tmp_path / "out" / "c.train.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "byte"
    in_memory = data.load_corpus(_cfg(tmp_path, heldout_fraction=0.25), BYTE, VOCAB)
    from_bin = data.load_corpus(
        DataConfig(
            train=(str(tmp_path / "out" / "c.train.bin"),),
            eval=(str(tmp_path / "out" / "c.heldout.bin"),),
            seq_len=16,
            batch_size=4,
        ),
        BYTE,
        VOCAB,
    )
    for a, b in ((in_memory.train, from_bin.train), (in_memory.heldout, from_bin.heldout)):
        np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
    assert isinstance(from_bin.train.parts[0], np.memmap)
    # Windows that straddle two parts of a stream read across the seam.
    two = data.TokenStream([from_bin.train.parts[0][:37], from_bin.train.parts[0][37:]])
    np.testing.assert_array_equal(two.read(30, 50), from_bin.train.read(30, 50))


def test_bin_file_errors(tmp_path):
    _write_docs(tmp_path, n=4)
    prepare_main([str(tmp_path / "*.txt"), "--out", str(tmp_path / "c"), "--workers", "1"])
    bin_path, cfg = tmp_path / "c.bin", DataConfig(train=(str(tmp_path / "c.bin"),), seq_len=16, batch_size=4)
    # Out of the model's vocabulary: the file holds EOS = 257.
    with pytest.raises(data.DataError, match="token id 257, outside the model's vocabulary"):
        data.load_corpus(cfg, BYTE, 200)

    # Another tokenizer.
    class Other(ByteTokenizer):
        identity = "sentencepiece:0123"

    with pytest.raises(data.DataError, match="tokenized with byte, but data.tokenizer is sentencepiece:0123"):
        data.load_corpus(cfg, Other(), VOCAB)
    # Truncated.
    bin_path.write_bytes(bin_path.read_bytes()[:-3])
    with pytest.raises(data.DataError, match="truncated"):
        data.load_corpus(cfg, BYTE, VOCAB)
    # No sidecar.
    data.sidecar_path(bin_path).unlink()
    with pytest.raises(data.DataError, match="no sidecar"):
        data.load_corpus(cfg, BYTE, VOCAB)


def test_out_of_vocab_ids_in_a_batch_are_an_error():
    windows = np.array([[BOS, 3, 300, 4]], np.int32)
    with pytest.raises(data.DataError, match="token id 300 is outside the model's vocabulary"):
        data.make_batch(windows, bos_id=BOS, vocab_size=VOCAB)


def test_empty_and_missing_sources_are_errors(tmp_path):
    with pytest.raises(data.DataError, match="matches no file"):
        data.load_corpus(_cfg(tmp_path), BYTE, VOCAB)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="hold no training documents"):
        data.load_corpus(_cfg(tmp_path), BYTE, VOCAB)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:1 has no string field 'text'"):
        data.load_corpus(DataConfig(train=(str(tmp_path / "bad.jsonl"),)), BYTE, VOCAB)
    (tmp_path / "short.txt").write_text("tiny")
    stream = data.load_corpus(_cfg(tmp_path), BYTE, VOCAB).train
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.train_dataset(_cfg(tmp_path), stream, seed=0, bos_id=BOS, vocab_size=VOCAB)


def test_eval_batches_are_full_and_padded(tmp_path):
    texts = _write_docs(tmp_path, n=5)
    stream = data.TokenStream([_stream_of(texts)])
    cfg = _cfg(tmp_path, batch_size=4)
    ds = data.eval_dataset(cfg, stream, bos_id=BOS, vocab_size=VOCAB, max_batches=None)
    batches = list(ds)
    assert all(b["inputs"].shape == (4, 16) for b in batches)
    counted = sum(b["weights"].sum() for b in batches)
    full = _stream_of(texts)
    assert counted == (full[1:] != BOS).sum()
    assert len(data.eval_dataset(cfg, stream, bos_id=BOS, vocab_size=VOCAB, max_batches=1)) == 1


def test_a_binary_file_named_as_text_is_refused_and_other_encodings_are_read(tmp_path):
    binary = tmp_path / "model.bin.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(data.DataError, match=r"model.bin.txt is not text: it holds NUL bytes"):
        list(data.iter_documents(data.Source("text", binary, binary.name)))
    # Python source in the encoding it declares; other text as UTF-8, warned about when much of it is not
    latin = tmp_path / "latin.py"
    latin.write_bytes("# -*- coding: latin-1 -*-\nname = 'Müller'\n".encode("latin-1"))
    ((_, text),) = data.iter_documents(data.Source("text", latin, latin.name))
    assert "Müller" in text
    cyrillic = tmp_path / "koi8.txt"
    cyrillic.write_bytes("Привет, мир. ".encode("koi8_r") * 20)
    with pytest.warns(data.DataWarning, match=r"koi8.txt: 180 of its 260 characters are not utf-8"):
        list(data.iter_documents(data.Source("text", cyrillic, cyrillic.name)))
