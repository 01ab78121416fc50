"""Corpora, tokenizers, shards and the packed loader."""

import json
from pathlib import Path

import numpy as np
import pytest

from archifactory.config import ConfigError, validate
from archifactory.data.corpora import FilesCorpus, HubCorpus, ShakespeareCorpus, TinyStoriesCorpus
from archifactory.data.loader import PackedLoader, eval_batches, eval_targets
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
    with pytest.warns(UserWarning, match="manifest.json is damaged"):
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
    ones = np.ones(1000, dtype=np.uint32)
    batches = list(eval_batches(tokens, ones, 10, 4, max_tokens=95))  # capped: whole windows only
    assert sum(x.numel() for x, _, _ in batches) == 90 == eval_targets(1000, 10, 95)
    assert int(batches[0][0][0, 0]) == 0 and int(batches[0][1][0, 0]) == 1
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(np.arange(5, dtype=np.uint16), 16, 1, seed=0)


def test_eval_batches_score_every_target_of_a_short_split_final_window_included():
    tokens = np.arange(1000, dtype=np.uint16)
    bytes_ = np.arange(1000, dtype=np.uint32) % 7
    batches = list(eval_batches(tokens, bytes_, 64, 4, max_tokens=10**6))
    targets = np.concatenate([y.flatten().numpy() for _, y, _ in batches])
    assert (targets == tokens[1:]).all()  # 15 whole windows, then the last 39 targets in one shorter window
    assert batches[-1][1].shape == (1, 999 - 15 * 64)
    for x, y, b in batches:
        assert (y == x + 1).all() and (b.numpy() == bytes_[y.numpy()]).all()
    # a split shorter than one window is one shorter window; fewer than two tokens cannot be evaluated
    ((x, y, b),) = eval_batches(tokens[:20], bytes_[:20], 64, 4, max_tokens=4096)
    assert x.shape == y.shape == b.shape == (1, 19)
    for n in (0, 1):
        with pytest.raises(ValueError, match=f"validation split has {n} token.*seq_len=64"):
            list(eval_batches(tokens[:n], bytes_[:n], 64, 4, max_tokens=4096))


# ------------------------------------------------------------------------------------- bits per byte

MIXED_TEXT = ("Once upon a time, Zoë and Ångström met a naïve café owner — «très bien» 😀🎉👩‍👩‍👧!\n"
              "  Two  spaces, a tab\there; 日本語のテキストと中文。 Ελληνικά, кириллица, emoji at the end 🚀")


def sentencepiece_style(docs: list[str], layout: str, vocab_size: int = 600):
    """A SentencePiece-style BPE with byte fallback, built locally with ``tokenizers`` (no hub): the 256
    ``<0xXX>`` pieces are in the model's vocabulary, unknown characters fall back to them. ``layout``:
    ``llama2`` (normalizer prepends ``▁`` and replaces spaces, decoder strips the first space, as
    Llama-2/Mistral's tokenizer.json) or ``metaspace`` (Metaspace pre-tokenizer and decoder, as the
    newer conversions of those and Gemma-style files)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    plain.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    learned = json.loads(plain.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.add_special_tokens(specials)
    if layout == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                             decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, backend.token_to_id("</s>"), f"sp-{layout}")


@pytest.fixture(scope="module")
def tokenizers_under_test(cache):
    corpus = TinyStoriesCorpus(path=str(TINYSTORIES), max_documents=300)
    docs = list(corpus.split("train"))
    return {
        "bytes": ByteTokenizerConfig().load_or_train(corpus, cache, 257),
        "bpe": BPETokenizerConfig().load_or_train(corpus, cache, 512),
        "sp-llama2": sentencepiece_style(docs, "llama2"),
        "sp-metaspace": sentencepiece_style(docs, "metaspace"),
    }


@pytest.mark.parametrize("name", ["bytes", "bpe", "sp-llama2", "sp-metaspace"])
def test_token_bytes_follow_the_text_each_token_covers(tokenizers_under_test, name):
    """Checked against the tokenizer's own decoder: the bytes of the first i tokens equal the UTF-8
    length of ``decode(ids[:i])`` wherever that prefix ends on a whole character."""
    tok = tokenizers_under_test[name]
    for text in (MIXED_TEXT, "Zoë's café", "Hello world", "end with spaces   "):
        ((ids, counts),) = tok.encode_batch_with_bytes([text])
        assert tok.decode(ids) == text  # lossless: byte-level, or byte fallback for unseen characters
        assert len(counts) == len(ids) and (counts >= 0).all()
        if name.startswith("sp") and text == MIXED_TEXT:
            assert any(tok.backend.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback in use
        cumulative = np.cumsum(counts)
        checked = 0
        for i in range(1, len(ids) + 1):
            prefix = tok.decode(ids[:i])
            if "\ufffd" not in prefix and text.startswith(prefix):
                assert cumulative[i - 1] == len(prefix.encode("utf-8")), (name, i, prefix)
                checked += 1
        assert checked > len(ids) // 3
        assert int(counts.sum()) <= len(text.encode("utf-8"))


@pytest.mark.parametrize("name", ["bytes", "bpe", "sp-llama2", "sp-metaspace"])
def test_bytes_summed_over_evaluated_targets_equal_the_text_they_cover(tokenizers_under_test, tmp_path, name):
    tok = tokenizers_under_test[name]
    docs = ["Zoë's café", MIXED_TEXT, "日本語 😀 ok", "trailing space "]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*docs, "a training document"]))
    # a split seed that puts these documents in the validation split and the last one in training
    corpus = next(c for c in (FilesCorpus(paths=[str(path)], val_fraction=0.5, split_seed=k) for k in range(1000))
                  if list(c.split("val")) == docs)
    shards = build_shards(corpus, tok, tmp_path / "cache")
    tokens, counts = shards.tokens("val"), shards.token_bytes("val")
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert shards.manifest["splits"]["val"]["bytes"] == total == int(counts.sum())
    first = tok.decode(tokens[:1])  # "Zoë's" or a piece of it: the one token that is never a target
    assert "Zoë's café".startswith(first)
    for seq_len in (7, 16, 1000):
        scored = sum(int(b.sum()) for _, _, b in eval_batches(tokens, counts, seq_len, 3, max_tokens=10**6))
        assert scored == total - len(first.encode("utf-8"))


def test_a_tokenizer_file_with_truncation_still_encodes_whole_documents(tokenizers_under_test, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(tokenizers_under_test["sp-llama2"].backend.to_str())  # a copy
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64)
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = HFTokenizerConfig(name_or_path=str(tmp_path / "tokenizer.json")).load_or_train(None, tmp_path, 10**6)
    ((ids, counts),) = loaded.encode_batch_with_bytes([MIXED_TEXT])
    assert loaded.decode(ids) == MIXED_TEXT and int(counts.sum()) == len(MIXED_TEXT.encode("utf-8"))
