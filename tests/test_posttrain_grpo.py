"""GRPO: task checkers and answer extraction, group advantages, and the clipped loss with its gradient
for each loss type, against a hand computation and against TRL's GRPOTrainer._compute_loss."""

import collections
import fractions
import math
import statistics
import types

import pytest
import torch

from archifactory.posttrain.grpo_loss import group_advantages, grpo_loss
from archifactory.posttrain.tasks import (
    AnswerDataTask,
    ArithmeticTask,
    CountdownTask,
    TaskConfig,
    build_task,
    evaluate_expression,
    final_answer,
)

# ------------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("The sum is 579.", "579"),
        ("12 + 3 = 15\n#### 15", "15"),
        ("Answer: 1,234 apples, not 7", "1,234"),
        ("<think>\nmaybe 12, maybe 13\n</think>\n\n13", "13"),
        ("no number here", None),
        ("#### -4.5", "-4.5"),
    ],
)
def test_final_answer(completion, answer):
    assert final_answer(completion) == answer


def test_arithmetic_problems_are_seeded_exact_and_split():
    add, mul = ArithmeticTask("+", digits=3, seed=1), ArithmeticTask("*", digits=2, seed=1)
    p = add.problem(5)
    a, b = (int(v) for v in p.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
    assert 100 <= a < 1000 and 100 <= b < 1000 and p.answer == str(a + b)
    assert add.problem(5) == p and add.problem(5, "test") != p and ArithmeticTask("+", 3, seed=2).problem(5) != p
    assert add.correct(f"It is {a + b}.", p) and not add.correct(f"It is {a + b + 1}.", p)
    assert not add.correct("I do not know", p) and add.well_formed("7", p) and not add.well_formed("none", p)
    q = mul.problem(0)
    x, y = (int(v) for v in q.prompt.removeprefix("What is ").removesuffix("?").split(" * "))
    assert q.answer == str(x * y) and mul.correct(f"#### {x * y}", q)


def test_held_out_problems_are_never_training_problems():
    """With 1-digit operands the 100 pairs all come up within a few thousand draws: the test split holds a
    seeded share of them, the training split the rest, and no pair is in both."""
    task = ArithmeticTask("+", digits=1, seed=0, test_fraction=0.2)
    operands = lambda p: tuple(int(v) for v in p.prompt.removeprefix("What is ").removesuffix("?").split(" + "))  # noqa: E731
    train = {operands(task.problem(i)) for i in range(3000)}
    test = {operands(task.problem(i, "test")) for i in range(1000)}
    assert train.isdisjoint(test) and train | test == {(a, b) for a in range(10) for b in range(10)}
    assert 5 <= len(test) <= 40  # Binomial(100, 0.2): mean 20, sd 4
    other = {operands(ArithmeticTask("+", 1, seed=1, test_fraction=0.2).problem(i, "test")) for i in range(1000)}
    assert other != test  # the seed chooses which pairs are held out
    countdown = CountdownTask(n_numbers=2, max_number=5, seed=0, test_fraction=0.3)
    key = lambda p: (tuple(sorted(p.numbers)), p.answer)  # noqa: E731
    assert {key(countdown.problem(i)) for i in range(500)}.isdisjoint(key(countdown.problem(i, "test")) for i in range(200))
    with pytest.raises(ValueError, match="no test problem in"):
        ArithmeticTask("+", digits=1, test_fraction=1e-9).problem(0, "test")
    with pytest.raises(ValueError, match="test_fraction=1.5 must be in"):
        build_task("addition", test_fraction=1.5)
    assert TaskConfig(name="addition", digits=1, test_fraction=0.2).build().problem(7, "test") == task.problem(7, "test")


def test_countdown_checker_is_exact_and_every_problem_is_solvable():
    task = CountdownTask(n_numbers=3, max_number=20, seed=0)
    for i in range(20):
        p = task.problem(i)
        assert len(p.numbers) == 3 and int(p.answer) > 0
    p = type(task.problem(0))("", "24", (4, 6, 1))
    assert task.correct("<answer>4 * 6 * 1</answer>", p)
    assert task.correct("<think>hmm</think> (6 - 1) * 4 + 4 ... no\n<answer>(1 + 6 - 1) * 4</answer>", p) is False
    assert not task.correct("<answer>4 * 6</answer>", p)  # every number exactly once
    assert not task.correct("<answer>4 * 6 * 1 * 1</answer>", p)
    assert not task.correct("<answer>__import__('os')</answer>", p)
    assert task.correct("4*6/1 = 24", p)
    assert evaluate_expression("(7 - 1) / 4") == (fractions.Fraction(3, 2), [7, 1, 4])
    for bad in ("2 ** 3", "abs(2)", "1 / 0", "x + 1"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)


def test_gsm8k_style_records(tmp_path):
    import json

    rows = [{"question": f"Q{i}", "answer": f"work...\n#### {i * 1000:,}"} for i in range(10)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task("gsm8k", data=path, test_fraction=0.2)
    assert len(task.splits["test"]) == 2 and len(task.splits["train"]) == 8
    assert {p.prompt for p in task.splits["test"]}.isdisjoint(p.prompt for p in task.splits["train"])
    p = task.problem(3)
    i = int(p.prompt[1:])
    assert p.answer == str(i * 1000) and task.correct(f"so #### {i * 1000:,}", p) and not task.correct("#### 1", p)
    with pytest.raises(ValueError, match="record 0 lacks 'q'"):
        AnswerDataTask(str(path), question_field="q")
    with pytest.raises(ValueError, match="unknown task"):
        build_task("chess")


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_match_trl():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0])
    grouped = rewards.view(-1, 3)
    expected = (rewards - grouped.mean(1).repeat_interleave(3)) / (nanstd(grouped, dim=1).repeat_interleave(3) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 3), expected)
    assert torch.allclose(group_advantages(rewards, 3)[3:6], torch.zeros(3))  # all equal: no signal
    by_hand = [(1 - 1 / 3) / (math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) + 1e-4)]
    assert group_advantages(rewards, 3)[0].item() == pytest.approx(by_hand[0], rel=1e-6)
    batch = (rewards - grouped.mean(1).repeat_interleave(3)) / (nanstd(rewards) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 3, "batch"), batch)
    assert torch.allclose(group_advantages(rewards, 3, "none"), rewards - grouped.mean(1).repeat_interleave(3))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


# ------------------------------------------------------------------------------------------------- loss

# a fixed small batch: 4 completions (2 groups of 2), 3 token slots, the last of rows 1 and 3 is padding
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7], [-2.2, -0.1, -0.9], [-0.6, -0.8, -1.5]]
OLD = [[-1.1, -0.9, -2.0], [-0.3, -0.8, -0.7], [-2.0, -0.4, -0.5], [-0.9, -0.8, -1.5]]
REF = [[-1.3, -0.4, -1.8], [-0.5, -1.0, -0.2], [-2.1, -0.3, -1.1], [-0.2, -0.9, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
ADV = [0.9, -0.9, -1.2, 1.2]
EPS = 0.2


def hand_loss_and_grad(loss_type: str, beta: float, max_len: int = 3):
    """Plain-Python loss and d loss / d logp for each token, from the formulas in grpo_loss.py's docstring."""
    B, T = len(LOGP), len(LOGP[0])
    n_total = sum(map(sum, MASK))
    per, dper = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            r = math.exp(LOGP[b][t] - OLD[b][t])
            a = ADV[b]
            rc = min(max(r, 1 - EPS), 1 + EPS)
            unclipped = r * a <= rc * a
            per[b][t] = -min(r * a, rc * a)
            dper[b][t] = -a * r if unclipped else 0.0  # d(r)/d(logp) = r; the clipped branch is constant
            d = REF[b][t] - LOGP[b][t]
            per[b][t] += beta * (math.exp(d) - d - 1)
            dper[b][t] += beta * (1 - math.exp(d))
    weight = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if MASK[b][t]:
                weight[b][t] = {
                    "grpo": 1 / (sum(MASK[b]) * B),
                    "bnpo": 1 / n_total,
                    "dapo": 1 / n_total,
                    "dr_grpo": 1 / (B * max_len),
                }[loss_type]
    loss = sum(per[b][t] * weight[b][t] for b in range(B) for t in range(T))
    grad = [[dper[b][t] * weight[b][t] for t in range(T)] for b in range(B)]
    return loss, grad


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradient_match_a_hand_computation(loss_type, beta):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    out = grpo_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                    torch.tensor(MASK), ref_logprobs=torch.tensor(REF, dtype=torch.float64), beta=beta,
                    epsilon_low=EPS, loss_type=loss_type, max_completion_length=3)
    out.loss.backward()
    loss, grad = hand_loss_and_grad(loss_type, beta)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # the batch has clipped tokens on both sides, so the test exercises the clip
    ratio = torch.exp(torch.tensor(LOGP) - torch.tensor(OLD))
    assert ((ratio > 1 + EPS) & (torch.tensor(ADV)[:, None] > 0)).any() and ((ratio < 1 - EPS) & (torch.tensor(ADV)[:, None] < 0)).any()
    clipped = ((ratio < 1 - EPS) & (torch.tensor(ADV)[:, None] < 0)) | ((ratio > 1 + EPS) & (torch.tensor(ADV)[:, None] > 0))
    assert out.clip_fraction.item() == pytest.approx((clipped & torch.tensor(MASK).bool()).sum().item() / 10)


def test_dapo_normalises_over_the_whole_step():
    """Split in two micro-batches with the step's token count, the gradients add up to the full batch's."""
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    args = dict(epsilon_low=EPS, loss_type="dapo")
    full = grpo_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                     torch.tensor(MASK), **args)
    (g_full,) = torch.autograd.grad(full.loss, logp)
    parts = [grpo_loss(logp[s], torch.tensor(OLD, dtype=torch.float64)[s], torch.tensor(ADV, dtype=torch.float64)[s],
                       torch.tensor(MASK)[s], n_tokens=10, **args).loss for s in (slice(0, 2), slice(2, 4))]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    assert torch.allclose(g_parts, g_full, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradient_match_trl(loss_type, beta):
    """TRL's GRPOTrainer._compute_loss (trl 1.16.0) run on the same log-probabilities: the model call is
    replaced by a function returning them, the trainer by the attributes the loss reads."""
    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer

    logp = torch.tensor(LOGP, requires_grad=True)
    accelerator = types.SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, reduction: x,
                                        gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        beta=beta, loss_type=loss_type, epsilon_low=EPS, epsilon_high=EPS, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        max_completion_length=3, current_gradient_accumulation_steps=1, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True), accelerator=accelerator,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(4, 1, dtype=torch.long), "prompt_mask": torch.ones(4, 1, dtype=torch.long),
        "completion_ids": torch.zeros(4, 3, dtype=torch.long), "completion_mask": torch.tensor(MASK),
        "advantages": torch.tensor(ADV), "old_per_token_logps": torch.tensor(OLD),
        "ref_per_token_logps": torch.tensor(REF), "num_items_in_batch": torch.tensor(10.0),
    }
    expected = GRPOTrainer._compute_loss(stub, None, inputs)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    ours = grpo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), ref_logprobs=torch.tensor(REF),
                     beta=beta, epsilon_low=EPS, loss_type=loss_type, max_completion_length=3)
    (grad,) = torch.autograd.grad(ours.loss, logp)
    assert ours.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert ours.clip_fraction.item() == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][0], rel=1e-6)
    if beta:
        assert ours.kl.item() == pytest.approx(stub._metrics["train"]["kl"][0], rel=1e-6)
    assert trl.__version__ == "1.16.0"  # the stub lists the attributes this version's _compute_loss reads


# ------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An SFT run stand-in: a bytes-like BPE (digits and a few words), the tiny preset with the chat tokens,
    the chat template; no training (GRPO only needs the run's files)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from archifactory.data.tokenizer import Tokenizer
    from archifactory.model.config import load_model_config
    from archifactory.model.lm import CausalLM
    from archifactory.posttrain.chat import ChatTemplate, add_chat_tokens

    run = tmp_path_factory.mktemp("sft_run")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([f"What is {i} + {i * 7}? {i * 8}" for i in range(200)], trainer=trainer)
    tokenizer, _, _ = add_chat_tokens(Tokenizer(backend, backend.token_to_id("<|endoftext|>"), "t"))
    tokenizer.save(run / "tokenizer.json")
    ChatTemplate().save(run)
    torch.manual_seed(0)
    CausalLM(load_model_config("tiny", [f"vocab_size={tokenizer.vocab_size}", "n_layers=2"])).save_pretrained(run / "model")
    return run


def grpo_config(base, tmp_path, name="grpo", **train):
    return {
        "name": name, "base": str(base), "task": {"name": "addition", "digits": 1},
        "grpo": {"num_generations": 4, "max_completion_length": 4, "eval_problems": 4},
        "optimizer": {"lr": 1e-3},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2,
                  "log_every": 1, "threads": 1, "progress": False, "precision": "fp32", **train},
        "out_dir": str(tmp_path / name),
    }


def test_an_sft_run_whose_tokenizer_has_more_ids_than_its_model_is_refused(sft_run, tmp_path):
    """Another model's tokenizer.json in the SFT run: before, a TypeError or IndexError deep in the rollout."""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer

    from archifactory.errors import InputError
    from archifactory.model.config import load_model_config
    from archifactory.model.lm import CausalLM
    from archifactory.posttrain.grpo import GRPOTrainer, load_grpo_config

    other = tmp_path / "other"
    shutil.copytree(sft_run, other)
    ids = HFTokenizer.from_file(str(other / "tokenizer.json")).get_vocab_size()
    CausalLM(load_model_config("tiny", [f"vocab_size={ids - 8}", "n_layers=2"])).save_pretrained(other / "model")
    trainer = GRPOTrainer(load_grpo_config(grpo_config(other, tmp_path)), resume=False)
    with pytest.raises(InputError, match=rf"tokenizer.json: the tokenizer has {ids} ids but the model's vocab_size is {ids - 8}"):
        trainer.setup()


def test_grpo_run_logs_its_metrics_and_resumes_exactly(sft_run, tmp_path):
    from archifactory.model.lm import CausalLM
    from archifactory.posttrain.grpo import grpo
    from archifactory.train.metrics import read_metrics

    summary = grpo(grpo_config(sft_run, tmp_path))
    run = tmp_path / "grpo"
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "grpo"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(0 <= r["pass_rate"] <= 1 and 1 <= r["completion_length"] <= 4 for r in steps)
    assert all(r["kl"] == 0 and r["clip_fraction"] == 0 for r in steps)  # beta 0; one update per rollout
    assert all(0 <= r["frac_reward_zero_std"] <= 1 and r["reward_std"] >= 0 for r in steps)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["stage"] == "grpo"
    uninterrupted = CausalLM.from_pretrained(run / "model").state_dict()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "model")
    grpo(grpo_config(sft_run, tmp_path))
    resumed = CausalLM.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(uninterrupted[k], v) for k, v in resumed.items())
    again = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "grpo" and r["step"] > 2]
    assert again[-2:] == steps[-2:]  # the resumed steps sample the same completions and rewards


class FirstCharTask:
    """A task whose answer is right when the completion starts with one of ``chars``: its probability under
    a model is the softmax mass of the tokens that decode to such a start, a closed form from one forward."""

    name, chars = "first-char", set("abcdefghijklmnopqrstuvwxyzW")

    def problem(self, index, split="train"):
        from archifactory.posttrain.tasks import Problem

        return Problem(f"What is {index} + {2 * index}?", "")

    def correct(self, completion, problem):
        return completion[:1] in self.chars


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 40)])
def test_sampled_exact_match_is_the_probability_of_a_right_answer(sft_run, temperature, top_k):
    """pass@1 from n samples converges to the model's probability of answering right (closed form: the
    temperature- and top-k-adjusted softmax mass of the right first tokens); top-k 1 sampling is greedy."""
    from archifactory.data.tokenizer import Tokenizer
    from archifactory.model.lm import CausalLM
    from archifactory.posttrain.chat import ChatTemplate
    from archifactory.posttrain.grpo import exact_match, prompt_ids

    tokenizer, template = Tokenizer.load(sft_run / "tokenizer.json"), ChatTemplate.load(sft_run)
    model, task = CausalLM.from_pretrained(sft_run / "model").eval(), FirstCharTask()
    right = torch.tensor([tokenizer.decode([t])[:1] in task.chars for t in range(tokenizer.vocab_size)])
    assert 0 < right.sum() < len(right) - 10
    n_problems, samples = 3, 600
    expected = []
    for i in range(n_problems):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids(template, tokenizer, task.problem(i, "test"))])).logits[0, -1]
        logits = logits.double() / temperature
        if top_k:
            logits[logits < logits.topk(top_k).values[-1]] = -math.inf
        expected.append(float(logits.softmax(-1)[right].sum()))
    mean = statistics.mean(expected)
    se = math.sqrt(sum(p * (1 - p) for p in expected) / samples) / n_problems
    got = exact_match(model, tokenizer, template, task, n_problems, 2, samples=samples, temperature=temperature,
                      top_k=top_k)
    assert abs(got - mean) < 4 * se, (got, mean, se)
    greedy = exact_match(model, tokenizer, template, task, 8, 2)
    assert exact_match(model, tokenizer, template, task, 8, 2, samples=3, top_k=1) == greedy
    def em(n, start=0):
        return exact_match(model, tokenizer, template, task, n, 2, start=start)

    assert 12 * em(12) == pytest.approx(4 * em(4) + 8 * em(8, start=4))  # start: problems start .. start + n - 1


def test_grpo_evaluations_sample_pass_at_1_with_eval_samples(sft_run, tmp_path):
    from archifactory.data.tokenizer import Tokenizer
    from archifactory.model.lm import CausalLM
    from archifactory.posttrain.chat import ChatTemplate
    from archifactory.posttrain.grpo import exact_match, grpo
    from archifactory.posttrain.tasks import build_task
    from archifactory.train.metrics import read_metrics

    cfg = grpo_config(sft_run, tmp_path, max_steps=2)
    cfg["grpo"].update(eval_samples=5, temperature=0.8, top_k=20)
    summary = grpo(cfg)
    evals = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and all(0 <= r["eval_pass_at_1"] <= 1 for r in evals)
    assert summary["eval_pass_at_1"] == evals[-1]["eval_pass_at_1"]
    # step 0 is the SFT model's pass@1 on the same problems with the same samples
    tokenizer, template = Tokenizer.load(sft_run / "tokenizer.json"), ChatTemplate.load(sft_run)
    start = exact_match(CausalLM.from_pretrained(sft_run / "model"), tokenizer, template,
                        build_task("addition", digits=1), 4, 4, samples=5, temperature=0.8, top_k=20)
    assert evals[0]["eval_pass_at_1"] == start


def test_grpo_step_is_the_loss_of_its_rollouts(sft_run, tmp_path):
    """One micro-batch by hand: the trainer's loss equals grpo_loss on log-probabilities recomputed from
    its rollout, and its gradient is -(A * d logp) summed over completion tokens / their number."""
    from archifactory.posttrain.grpo import GRPOTrainer, load_grpo_config
    from archifactory.train.metrics import read_metrics

    cfg = grpo_config(sft_run, tmp_path, "hand", micro_batch_size=8)
    cfg["grpo"] |= {"format_reward": 1.0, "max_completion_length": 6}  # random completions differ in form
    trainer = GRPOTrainer(load_grpo_config(cfg), resume=False)
    trainer.setup()
    trainer.metrics.close()
    loss = trainer.micro_loss(0)
    r = trainer._rollouts[0]
    mask = r["targets"] != -100
    assert r["input_ids"].shape[0] == 8 and torch.equal(r["targets"][:, :-1][mask[:, :-1]], r["input_ids"][:, 1:][mask[:, :-1]])
    logits = trainer.model(r["input_ids"]).logits.log_softmax(-1)
    logp = logits.gather(-1, r["targets"].clamp(min=0)[..., None]).squeeze(-1)
    surrogate = -(r["advantages"][:, None] * torch.exp(logp - logp.detach()) * mask).sum() / mask.sum()
    assert torch.allclose(loss, surrogate, atol=1e-6)
    assert r["advantages"].abs().sum() > 0 and r["rewards"].std() > 0
    trainer._write_step_metrics()  # the within-group spread, by hand (torch.std is Bessel-corrected, as TRL's)
    groups = [r["rewards"][i:i + 4].tolist() for i in range(0, 8, 4)]
    spreads = [statistics.stdev(g) for g in groups]
    logged = read_metrics(trainer.run_dir / "metrics.jsonl")[-1]
    assert logged["reward_std"] == pytest.approx(sum(spreads) / 2, rel=1e-5)
    assert logged["frac_reward_zero_std"] == sum(s == 0 for s in spreads) / 2
    g1 = torch.autograd.grad(loss, list(trainer.model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(surrogate, list(trainer.model.parameters()), allow_unused=True)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-7) for a, b in zip(g1, g2))


def test_grpo_config_errors(sft_run, tmp_path):
    from archifactory.config import ConfigError
    from archifactory.posttrain.grpo import load_grpo_config

    with pytest.raises(ConfigError, match="whole groups"):
        load_grpo_config(grpo_config(sft_run, tmp_path, micro_batch_size=6, batch_size=6))
    with pytest.raises(ConfigError, match="finished SFT run"):
        load_grpo_config(grpo_config(tmp_path, tmp_path))
    # a prompt + completion the model cannot generate (RoPE, max_seq_len 256) is refused at setup, not mid-run
    from archifactory.posttrain.grpo import GRPOTrainer

    cfg = grpo_config(sft_run, tmp_path, "long")
    cfg["grpo"]["max_completion_length"] = 250
    with pytest.raises(ConfigError, match=r"grpo.max_completion_length=250: the longest prompt \((train|test) "
                                          r"problem \d+, chat template included\) does not fit: prompt \(\d+ tokens\)"):
        GRPOTrainer(load_grpo_config(cfg), resume=False).setup()
    cfg["grpo"]["max_completion_length"] = 200  # fits: no error at setup
    trainer = GRPOTrainer(load_grpo_config(cfg), resume=False)
    trainer.setup()
    trainer.metrics.close()


def test_cli_grpo(sft_run, tmp_path):
    from typer.testing import CliRunner

    from archifactory.cli import app

    out = tmp_path / "cli_grpo"
    result = CliRunner().invoke(app, ["grpo", str(sft_run), "--task", "countdown", "--out", str(out),
                                      "--set", "grpo.num_generations=2", "--set", "train.batch_size=2",
                                      "--set", "train.max_steps=1", "--set", "grpo.eval_problems=2",
                                      "--set", "grpo.max_completion_length=3", "--set", "train.progress=false"])
    assert result.exit_code == 0, result.output
    assert (out / "model" / "model.safetensors").is_file() and "stage: grpo" in (out / "config.yaml").read_text()
    assert "tokens, eval_accuracy 0." in result.output and "nan" not in result.output  # its figure, not val loss
    # resuming the finished run trains nothing and says so; a changed setup needs --allow-config-change
    args = ["grpo", str(out / "config.yaml")]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "already at step 1 of max_steps 1: nothing to train" in result.output, result.output
    assert "nan" not in result.output
    # known finished early (a GRPO run writes no data.json): no setup file written again, no file touched
    assert "resumed from" not in result.output, result.output
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == stamps
    # its template damaged where no checksum tells (a run from before they existed): written again from the
    # SFT run's, nothing trained
    template = (out / "chat_template.jinja").read_bytes()
    (out / "chat_template.jinja.checksum").unlink()
    (out / "chat_template.jinja").write_bytes(b"\xff" + template[1:])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "nothing to train" in result.output, result.output
    assert (out / "chat_template.jinja").read_bytes() == template
    # a damaged SFT template: GRPO names it and the command that writes it again (which it does: the
    # finished SFT run is prepared again, test_cli_sft_and_generate_chat; this stand-in has no config.yaml)
    sft_template = (sft_run / "chat_template.jinja").read_bytes()
    try:
        (sft_run / "chat_template.jinja").write_bytes(sft_template[:-1])
        result = CliRunner().invoke(app, ["grpo", str(sft_run), "--task", "countdown", "--out", str(tmp_path / "g2")])
    finally:
        (sft_run / "chat_template.jinja").write_bytes(sft_template)
    assert result.exit_code == 2 and "chat_template.jinja is damaged" in result.output, result.output
    assert f"archifactory train {sft_run / 'config.yaml'}" in result.output and len(result.output.splitlines()) == 1
    result = CliRunner().invoke(app, [*args, "--set", "train.seq_len=128", "--set", "train.max_steps=2"])
    assert result.exit_code == 2 and "--allow-config-change" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--set", "train.seq_len=128", "--set", "train.max_steps=2",
                                      "--allow-config-change"])
    assert result.exit_code == 0 and "changed setup" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--set", "train.max_steps=1"])
    assert result.exit_code == 2 and "is at step 2, past the run's budget of max_steps 1" in result.output


def test_several_updates_per_rollout_clip_the_ratio_to_the_sampling_weights(sft_run, tmp_path):
    """num_iterations=2: the second step reuses the first step's completions, and its loss is the clipped
    surrogate with ratio exp(logp_now - logp_sampling), computed here by hand from the two weight sets."""
    from archifactory.config import ConfigError
    from archifactory.posttrain.grpo import GRPOTrainer, load_grpo_config

    with pytest.raises(ConfigError, match="checkpoint_every=3 must be a multiple of grpo.num_iterations=2"):
        load_grpo_config({**grpo_config(sft_run, tmp_path, checkpoint_every=3),
                          "grpo": {"num_generations": 4, "num_iterations": 2}})
    cfg = grpo_config(sft_run, tmp_path, "mu", micro_batch_size=8)
    cfg["grpo"] |= {"format_reward": 1.0, "max_completion_length": 6, "num_iterations": 2, "epsilon": 0.05}
    cfg["optimizer"] = {"name": "adamw", "lr": 3e-2, "weight_decay": 0.0}
    trainer = GRPOTrainer(load_grpo_config(cfg), resume=False)
    trainer.setup()
    trainer.metrics.close()

    def logp(model, r):  # log-softmax of the logits, gathered at the completion tokens (temperature 1)
        logits = model(r["input_ids"]).logits
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, r["targets"].clamp(min=0)[..., None]).squeeze(-1)
        return picked - lse

    import copy

    sampling_model = copy.deepcopy(trainer.model)  # the weights that sample generation batch 0
    trainer.train_step()  # step 0: samples generation batch 0 and updates once
    r = trainer._rollouts[0]
    assert r["rewards"].std() > 0
    with torch.no_grad():
        old = logp(sampling_model, r)
    mask = r["targets"] != -100
    assert torch.allclose(r["old_logprobs"][mask], old[mask], atol=1e-5)
    trainer.step = 1
    loss = trainer.micro_loss(1)  # step 1, same generation batch: no new sampling
    assert trainer._rollouts[0] is r
    mask = mask.float()
    new = logp(trainer.model, r)
    ratio = torch.exp(new - old)
    adv = r["advantages"][:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - 0.05, 1 + 0.05) * adv)
    hand = (per_token * mask).sum() / mask.sum()
    assert not torch.allclose(ratio[mask.bool()], torch.ones_like(ratio[mask.bool()]))  # the weights moved
    clipped = ((ratio < 0.95) & (adv < 0)) | ((ratio > 1.05) & (adv > 0))
    assert clipped[mask.bool()].any()  # the clip binds somewhere
    assert float(loss.detach()) == pytest.approx(float(hand.detach()), rel=1e-4, abs=1e-6)
    g_loss = torch.autograd.grad(loss, list(trainer.model.parameters()), allow_unused=True)
    g_hand = torch.autograd.grad(hand, list(trainer.model.parameters()), allow_unused=True)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6)
               for a, b in zip(g_loss, g_hand))
    trainer.step = 2
    trainer.micro_loss(2)  # step 2 starts generation batch 1
    assert trainer._rollouts[0] is not r and trainer._generation == 1


def test_example_grpo_config_loads(sft_run):
    from pathlib import Path

    from archifactory.posttrain.grpo import load_grpo_config

    path = Path(__file__).resolve().parents[1] / "configs" / "runs" / "grpo-addition.yaml"
    cfg = load_grpo_config(path, [f"base={sft_run}"])
    assert cfg.stage == "grpo" and cfg.task.name == "addition" and cfg.grpo.num_generations == 16
    assert cfg.train.batch_size % cfg.grpo.num_generations == 0
