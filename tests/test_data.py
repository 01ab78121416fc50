"""Corpora, tokenizers, shards and the packed loader."""

import json
from pathlib import Path

import numpy as np
import pytest

from archifactory.config import ConfigError, validate
from archifactory.data.corpora import FilesCorpus, HubCorpus, ShakespeareCorpus, TinyStoriesCorpus
from archifactory.data.loader import PackedLoader, eval_batches
from archifactory.data.shards import build_shards
from archifactory.data.tokenizer import BPETokenizerConfig, ByteTokenizerConfig, HFTokenizerConfig, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINYSTORIES = SHARED / "tinystories" / "train.txt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# --------------------------------------------------------------------------------------------- corpora


def test_shakespeare_is_embedded_and_split_by_scene():
    corpus = ShakespeareCorpus()
    docs = list(corpus.documents())
    assert len(docs) > 500 and sum(len(d) for d in docs) > 4_000_000
    train, val = list(corpus.split("train")), list(corpus.split("val"))
    assert len(train) + len(val) == len(docs) and not set(train) & set(val)
    assert 0.02 < len(val) / len(docs) < 0.10
    assert list(corpus.split("val")) == val  # deterministic
    folio = ShakespeareCorpus(editions="folio")
    assert {p.name for p in folio.files()}.isdisjoint({p.name for p in corpus.files()})


def test_tinystories_local_file():
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES))
    docs = list(corpus.documents())
    assert len(docs) == 2086  # the NOTICE's count
    assert docs[0].startswith("One day, a little girl named Lily found a needle")
    assert all("<|endoftext|>" not in d for d in docs)
    with pytest.raises(FileNotFoundError, match="tinystories file not found"):
        list(TinyStoriesCorpus(path="/nonexistent.txt").documents())


def test_split_depends_on_seed_and_fraction_only():
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES), val_fraction=0.2)
    val = list(corpus.split("val"))
    assert 0.15 < len(val) / 2086 < 0.25
    reseeded = list(TinyStoriesCorpus(path=str(TINYSTORIES), val_fraction=0.2, split_seed=1).split("val"))
    assert val != reseeded


def test_files_corpus_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two", "pq three"]}), tmp_path / "d.parquet")
    corpus = FilesCorpus(paths=[str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")])
    assert list(corpus.documents()) == ["first file", "second file", "json one", "json two", "pq one", "pq two", "pq three"]
    sep = tmp_path / "s.txt"
    sep.write_text("one\n---\ntwo\nlines\n---\n")
    assert list(FilesCorpus(paths=[str(sep)], separator="---").documents()) == ["one", "two\nlines"]


def test_files_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list(FilesCorpus(paths=[str(tmp_path / "none*.txt")]).documents())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(FilesCorpus(paths=[str(bad)]).documents())
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(KeyError, match="no field 'text'; fields: \\['body'\\]"):
        list(FilesCorpus(paths=[str(bad)]).documents())
    with pytest.raises(ConfigError, match="unsupported suffix"):
        validate(FilesCorpus, {"kind": "files", "paths": ["x.csv"]})


def test_hub_corpus_reads_local_files_through_datasets(tmp_path):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    corpus = HubCorpus(name="json", data_files=[str(tmp_path / "x.jsonl")], text_field="content", streaming=False)
    assert list(corpus.documents()) == [f"doc {i}" for i in range(5)]
    assert len(list(HubCorpus(name="json", data_files=[str(tmp_path / "x.jsonl")], text_field="content",
                              max_documents=2).documents())) == 2


def test_hub_corpus_offline_error_is_clear():
    with pytest.raises(RuntimeError, match="could not load data set 'no-such/dataset'.*local files"):
        list(HubCorpus(name="no-such/dataset").documents())


# ------------------------------------------------------------------------------------------- tokenizers


def test_bpe_trains_to_size_round_trips_and_is_cached(cache):
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES))
    tok = BPETokenizerConfig().load_or_train(corpus, cache, 512)
    assert tok.vocab_size == 512 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    text = "Once upon a time, Zoë saw 3 dragons — naïve ones!\n\nThe end."
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: lossless, even for unseen characters
    assert len(ids) < len(text.encode())  # merges compress
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    files = list((cache / "tokenizers").glob("*.json"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = BPETokenizerConfig().load_or_train(corpus, cache, 512)
    assert again.fingerprint() == tok.fingerprint()
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # loaded, not retrained
    batch = tok.encode_batch(["a b", "c d e"])
    assert batch == [tok.encode("a b"), tok.encode("c d e")]


def test_bytes_and_local_hf_tokenizers(cache, tmp_path):
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES))
    tok = ByteTokenizerConfig().load_or_train(corpus, cache, 257)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169, 256]) == "hé"
    bpe = BPETokenizerConfig().load_or_train(corpus, cache, 512)
    bpe.save(tmp_path / "tokenizer.json")
    local = HFTokenizerConfig(name_or_path=str(tmp_path)).load_or_train(corpus, cache, 512)
    assert local.encode("The cat.") == bpe.encode("The cat.") and local.eos_id == bpe.eos_id
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint() == bpe.fingerprint()
    with pytest.raises(FileNotFoundError):
        HFTokenizerConfig(name_or_path=str(tmp_path / "missing.json")).load_or_train(corpus, cache, 512)


# ----------------------------------------------------------------------------------------------- shards


def test_shards_hold_documents_separated_by_eos(cache):
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES), max_documents=300)
    tok = BPETokenizerConfig().load_or_train(corpus, cache, 512)
    shards = build_shards(corpus, tok, cache)
    m = shards.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["tokenizer_hash"] == tok.fingerprint()
    train = np.asarray(shards.tokens("train"))
    docs = list(corpus.split("train"))
    assert m["splits"]["train"]["documents"] == len(docs) and len(train) == m["splits"]["train"]["tokens"]
    assert m["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in docs)
    eos_positions = np.flatnonzero(train == tok.eos_id)
    assert len(eos_positions) == len(docs)
    starts = shards.doc_starts("train")
    for i in (0, 5, len(docs) - 1):
        end = eos_positions[i]
        assert tok.decode(train[starts[i]:end].tolist()) == docs[i]
    # a second build reuses the directory
    stamp = (shards.directory / "train.bin").stat().st_mtime_ns
    again = build_shards(corpus, tok, cache)
    assert again.directory == shards.directory and (again.directory / "train.bin").stat().st_mtime_ns == stamp
    # a corrupt manifest is rebuilt rather than trusted
    (shards.directory / "manifest.json").write_text("{broken")
    rebuilt = build_shards(corpus, tok, cache)
    assert rebuilt.manifest["splits"] == m["splits"]


def test_shards_fail_clearly_on_empty_corpus(cache, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    corpus = FilesCorpus(paths=[str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="gave no training text"):
        build_shards(corpus, ByteTokenizerConfig().load_or_train(corpus, cache, 257), cache)


# ----------------------------------------------------------------------------------------------- loader


def test_loader_packs_shifted_windows_deterministically():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = PackedLoader(tokens, 16, 4, seed=3), PackedLoader(tokens, 16, 4, seed=3)
    x, y = a.batch(5)
    assert x.shape == (4, 16) and x.dtype.is_floating_point is False
    assert (y == x + 1).all()  # targets are the next tokens
    assert (x[:, 0] % 16 == 0).all()  # windows start on multiples of seq_len
    assert all((a.batch(i)[0] == b.batch(i)[0]).all() for i in range(20))  # same seed, same stream
    assert not (PackedLoader(tokens, 16, 4, seed=4).batch(5)[0] == x).all()


def test_loader_visits_every_window_once_per_epoch_and_resumes_anywhere():
    tokens = np.arange(16 * 12 + 1, dtype=np.uint16)
    loader = PackedLoader(tokens, 16, 3, seed=0)
    assert loader.n_windows == 12
    firsts = [int(r[0]) // 16 for i in range(4) for r in loader.batch(i)[0]]
    assert sorted(firsts) == list(range(12))
    second_epoch = [int(r[0]) // 16 for i in range(4, 8) for r in loader.batch(i)[0]]
    assert sorted(second_epoch) == list(range(12)) and second_epoch != firsts
    fresh = PackedLoader(tokens, 16, 3, seed=0)
    assert (fresh.batch(6)[0] == loader.batch(6)[0]).all()  # random access: resume without replay


def test_ranks_split_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    single = PackedLoader(tokens, 8, 4, seed=1)
    ranks = [PackedLoader(tokens, 8, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for i in range(5):
        joined = np.concatenate([ranks[0].batch(i)[0], ranks[1].batch(i)[0]])
        assert (joined == single.batch(i)[0].numpy()).all()
    with pytest.raises(ValueError, match="divisible"):
        PackedLoader(tokens, 8, 3, seed=1, world_size=2)
    assert single.stream_hash(4) == PackedLoader(tokens, 8, 4, seed=1).stream_hash(4)
    assert single.stream_hash(4) != PackedLoader(tokens, 8, 4, seed=2).stream_hash(4)


def test_eval_batches_are_fixed_and_bounded():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(eval_batches(tokens, 10, 4, max_tokens=95))
    assert sum(x.numel() for x, _ in batches) == 90
    assert int(batches[0][0][0, 0]) == 0 and int(batches[0][1][0, 0]) == 1
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(np.arange(5, dtype=np.uint16), 16, 1, seed=0)
