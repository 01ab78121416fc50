"""Sampling against references outside this package: torch.argmax / torch.topk / torch.multinomial,
transformers' TopK/TopP logits warpers, hand-made distributions, and a chi-square test of the empirical
frequencies."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.config import ModelConfig
from archifactory.model.lm import CausalLM
from archifactory.model.sampling import filter_logits, sample_next

VOCAB = 48


@pytest.fixture(scope="module")
def model() -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=64,
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2}, ffn={"kind": "swiglu", "hidden": 64},
        init={"std": 0.2},  # spread-out logits: no near-ties for greedy decoding
    )
    return CausalLM(config).eval()


def hf_warpers():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    return logits_process.TopKLogitsWarper, logits_process.TopPLogitsWarper


# ---------------------------------------------------------------------------------------------- greedy


def test_temperature_zero_is_argmax():
    torch.manual_seed(1)
    logits = torch.randn(16, VOCAB)
    assert torch.equal(sample_next(logits, temperature=0.0), torch.argmax(logits, dim=-1))
    # top_k / top_p do not change the argmax, and no randomness is drawn
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(sample_next(logits, 0.0, top_k=3, top_p=0.5, generator=gen), logits.argmax(-1))
    assert torch.equal(gen.get_state(), state)
    # bf16 logits are upcast, the argmax is the same
    assert torch.equal(sample_next(logits.bfloat16(), 0.0), logits.bfloat16().float().argmax(-1))


def test_greedy_generate_matches_full_recompute_argmax(model):
    prompt = torch.tensor([[3, 14, 15, 9], [2, 6, 5, 3]])
    out = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole sequence each step
            nxt = model(ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(out, ids)
    # a 1-D prompt gives a 1-D result
    single = model.generate(prompt[0].tolist(), max_new_tokens=8, temperature=0.0)
    assert torch.equal(single, ids[0])


# ----------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 2, 7, VOCAB, VOCAB + 10])
def test_top_k_keeps_exactly_the_k_largest(k):
    torch.manual_seed(2)
    logits = torch.randn(5, VOCAB)
    out = filter_logits(logits, top_k=k)
    kept = torch.isfinite(out)
    expected = torch.zeros_like(kept).scatter(-1, torch.topk(logits, min(k, VOCAB), dim=-1).indices, True)
    assert torch.equal(kept, expected)
    assert torch.equal(out[kept], logits[kept])  # survivors unchanged
    assert (out[~kept] == float("-inf")).all()
    TopK, _ = hf_warpers()
    assert torch.equal(out, TopK(k)(None, logits))


# ----------------------------------------------------------------------------------------------- top-p


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    "p,n_kept",
    [(0.3, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.8, 2), (0.81, 3), (0.94, 3), (0.96, 4), (1.0, 4)],
)
def test_top_p_keeps_smallest_prefix_reaching_p(p, n_kept):
    order = [2, 0, 3, 1]  # shuffled positions, so sorting is exercised
    logits = torch.full((1, 4), 0.0)
    for pos, prob in zip(order, PROBS):
        logits[0, pos] = torch.tensor(prob).log()
    out = filter_logits(logits, top_p=p)  # fp32, the dtype sample_next works in
    kept = torch.isfinite(out[0])
    assert int(kept.sum()) == n_kept
    # the kept ones are the most probable
    assert kept[order[:n_kept]].all()
    # mass reaches p with the kept set, and not without its least probable member
    assert sum(PROBS[:n_kept]) >= p - 1e-6
    assert sum(PROBS[: n_kept - 1]) < p


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_matches_hf_warper_on_random_logits(p, temperature):
    torch.manual_seed(3)
    _, TopP = hf_warpers()
    logits = torch.randn(32, VOCAB) * 2.0 / temperature
    ours = filter_logits(logits, top_p=p)
    ref = TopP(p)(None, logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.equal(ours, ref)
    # the filter is not a no-op
    if p < 0.95:
        assert (~torch.isfinite(ours)).any()


def test_top_k_then_top_p_matches_hf_chain():
    torch.manual_seed(4)
    TopK, TopP = hf_warpers()
    logits = torch.randn(32, VOCAB) * 2.0
    ours = filter_logits(logits, top_k=10, top_p=0.7)
    ref = TopP(0.7)(None, TopK(10)(None, logits))
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------ neutral settings


def large_vocab_logits() -> torch.Tensor:
    # spread-out logits over a 50,000-token vocabulary: a descending fp32 cumulative sum of their
    # probabilities reached 1.0 after 26,744 (AVX2) or 29,708 (AVX-512) tokens and cut the rest at top_p=1
    return torch.randn(4, 50_000, generator=torch.Generator().manual_seed(0)) * 4.0


def test_neutral_filters_are_exact_no_ops_like_transformers():
    TopK, TopP = hf_warpers()
    logits = large_vocab_logits()
    V = logits.shape[-1]
    for out in (filter_logits(logits, top_p=1.0), filter_logits(logits, top_k=V), filter_logits(logits, top_k=V + 7),
                filter_logits(logits, top_k=V, top_p=1.0), TopP(1.0)(None, logits), TopK(V)(None, logits)):
        assert torch.equal(out, logits)
    # temperature 1 with neutral filters draws exactly what multinomial(softmax) draws from the same generator
    draws = sample_next(logits, 1.0, V, 1.0, generator=torch.Generator().manual_seed(5))
    ref = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    assert torch.equal(draws, ref)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999, 0.99999])
def test_top_p_near_one_on_a_large_vocabulary_matches_transformers_in_fp64(p):
    # transformers' warper on fp64 logits sums the tail of each row accurately; ours gets fp32 logits
    _, TopP = hf_warpers()
    logits = large_vocab_logits()
    kept = torch.isfinite(filter_logits(logits, top_p=p))
    assert torch.equal(kept, torch.isfinite(TopP(p)(None, logits.double())))
    assert (~kept).any(), "the filter dropped nothing"


# ------------------------------------------------------------------------------- empirical frequencies


# chi-square critical values at significance 1e-4, by degrees of freedom
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def reference_distribution(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """Written out by hand in fp64: tempered softmax, the k most likely, the smallest prefix reaching p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    keep = order[: top_k or len(order)]
    if top_p is not None:
        sub = probs[keep] / probs[keep].sum()
        mass, n = 0.0, 0
        while n < len(keep) and mass < top_p:
            mass += float(sub[n])
            n += 1
        keep = keep[:n]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    n = counts.sum().item()
    support = expected > 0
    e = expected[support] * n
    stat = float(((counts[support].double() - e) ** 2 / e).sum())
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.0, None, 0.7), (0.8, 5, 0.9)],
)
def test_sample_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([1.2, -0.3, 0.8, 2.0, -1.5, 0.1, 0.5, -0.7])
    n = 40_000
    gen = torch.Generator().manual_seed(1234)
    draws = sample_next(logits.expand(n, -1), temperature, top_k, top_p, generator=gen)
    counts = torch.bincount(draws, minlength=logits.numel())
    expected = reference_distribution(logits, temperature, top_k, top_p)
    assert (counts[expected == 0] == 0).all()  # filtered tokens never drawn
    stat, df = chi_square(counts, expected)
    assert stat < CHI2_CRIT[df], (stat, df, counts.tolist(), expected.tolist())
    # the test has power: the untempered, unfiltered softmax is rejected when it differs
    plain = torch.softmax(logits.double(), -1)
    if (temperature, top_k, top_p) != (1.0, None, None):
        stat_plain = float(((counts.double() - plain * n) ** 2 / (plain * n)).sum())
        assert stat_plain > 10 * CHI2_CRIT[7]


# ---------------------------------------------------------------------------------------------- seeds


def test_generate_is_reproducible_with_seed(model):
    prompt = [5, 1, 7]
    a = model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=11)
    torch.manual_seed(999)  # the global RNG must not matter
    b = model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=11)
    c = model.generate(prompt, max_new_tokens=12, temperature=1.0, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (3 + 12,) and torch.equal(a[:3], torch.tensor(prompt))


def test_seeded_generate_leaves_global_rng_alone(model):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    model.generate([5, 1, 7], max_new_tokens=4, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    # unseeded generation draws from the global generator
    model.generate([5, 1, 7], max_new_tokens=4, temperature=1.0)
    assert not torch.equal(torch.get_rng_state(), state)


def test_seeded_generate_matches_manual_multinomial_loop(model):
    prompt = torch.tensor([[4, 8, 15], [16, 23, 42]])
    seed, temperature, top_k = 7, 0.9, 10
    out = model.generate(prompt, max_new_tokens=6, temperature=temperature, top_k=top_k, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(6):
            logits = model(ids).logits[:, -1].float() / temperature
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_generate_eos_pads_finished_rows(model):
    prompt = torch.tensor([[3, 14, 15], [9, 2, 6]])
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    eos = int(greedy[0, 4])  # row 0 emits it as its second new token
    out = model.generate(prompt, max_new_tokens=6, temperature=0.0, eos_token_id=eos)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])
    assert torch.equal(out[0, : 3 + first + 1], greedy[0, : 3 + first + 1])


# --------------------------------------------------------------------------------------- invalid args


def test_invalid_arguments_raise(model):
    logits = torch.randn(2, VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-0.1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, top_k=0)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sample_next(logits, top_p=bad)
    with pytest.raises(ValueError, match="empty"):
        model.generate([], max_new_tokens=3)
