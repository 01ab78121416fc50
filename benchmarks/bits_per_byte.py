"""Bits per byte with bytes counted per token alone (before issue 8) vs from each token's span in the text.

    python benchmarks/bits_per_byte.py [--vocab 2048] [--train-steps 60] [--out benchmarks/results/bits_per_byte.json]

On the Shakespeare corpus's validation split, for a byte-level BPE (as ``tokenizer.kind: bpe``) and a
SentencePiece-style BPE with byte fallback (the Llama-2/Mistral ``tokenizer.json`` layout, built locally
with ``tokenizers``; the builder is the tests' ``sentencepiece_style``), counts the UTF-8 bytes the
tokens stand for three ways: decoding each token alone (what ``Tokenizer.token_bytes()`` did), from the
tokens' spans (``ShardSet.token_bytes``, what evaluation uses now), and the split's true UTF-8 length.
With ``--train-steps`` it also trains the ``tiny`` model on each tokenizer and reports the final
validation bits per byte both ways (same nats, the two byte counts).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

from _common import record_header, write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def bytes_decoding_each_token_alone(tok, ids) -> int:
    """The old count: a table of ``len(decode([id]).encode())`` (byte-level BPE: characters of the token)."""
    import numpy as np

    specials = {t.content for t in tok.backend.get_added_tokens_decoder().values()}
    byte_level = type(tok.backend.decoder).__name__ == "ByteLevel"
    table = np.zeros(tok.vocab_size, dtype=np.int64)
    for token, i in tok.backend.get_vocab().items():
        if token not in specials:
            table[i] = len(token) if byte_level else len(tok.backend.decode([i]).encode("utf-8"))
    return int(table[np.asarray(ids, dtype=np.int64)].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from archifactory.data.corpora import ShakespeareCorpus
    from archifactory.data.shards import build_shards
    from archifactory.data.tokenizer import BPETokenizerConfig
    from archifactory.train import load_run_config, train
    from test_data import sentencepiece_style

    torch.set_num_threads(1)
    corpus = ShakespeareCorpus()
    results = {**record_header(), "device": f"cpu ({platform.machine()}, 1 thread)",
               "corpus": "shakespeare (val split)", "vocab": args.vocab, "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = list(corpus.split("train"))
        tokenizers = {"bpe (byte-level)": BPETokenizerConfig(vocab_size=args.vocab).load_or_train(corpus, tmp, args.vocab)}
        sp = sentencepiece_style(docs, "llama2", vocab_size=args.vocab)
        sp.save(tmp / "sp.json")
        tokenizers["sentencepiece-style (llama2 layout)"] = sp
        for name, tok in tokenizers.items():
            shards = build_shards(corpus, tok, tmp)
            val = shards.tokens("val")
            row = {"true_utf8_bytes": shards.manifest["splits"]["val"]["bytes"],
                   "span_bytes": int(shards.token_bytes("val").sum()),
                   "decoded_alone_bytes": bytes_decoding_each_token_alone(tok, val),
                   "tokens": len(val)}
            row["bpb_ratio_old_over_new"] = row["span_bytes"] / row["decoded_alone_bytes"]
            if args.train_steps:
                kind = {"kind": "hf", "name_or_path": str(tmp / "sp.json")} if name.startswith("sentence") else \
                    {"kind": "bpe", "vocab_size": args.vocab}
                cfg = load_run_config({
                    "name": "bpb", "model": "tiny",  # vocabulary 2048
                    "data": {"corpus": {"kind": "shakespeare"}, "tokenizer": kind, "cache_dir": str(tmp)},
                    "train": {"seq_len": 128, "batch_size": 16, "max_steps": args.train_steps, "eval_every": 10**6,
                              "eval_tokens": 10**8, "progress": False, "threads": 1},
                    "out_dir": str(tmp / "run"),
                })
                summary = train(cfg, resume=False)
                targets = len(val) - 1  # eval_tokens above covers the whole split
                nats = summary["val_loss"] * targets
                row["val_loss"] = summary["val_loss"]
                row["val_bpb_now"] = summary["val_bpb"]
                row["val_bpb_decoding_each_token_alone"] = nats / math.log(2) / bytes_decoding_each_token_alone(
                    tok, val[1:])
            results["tokenizers"][name] = row
            print(name, json.dumps(row, indent=1), flush=True)
    write_record(args.out, results)


if __name__ == "__main__":
    main()
