"""Passkey retrieval: the generator puts the needle where it says, the eval scores an oracle 100% and a random
guesser at chance, teacher forcing agrees with greedy decoding, the trainer hook and the CLI write results."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import passkey
from trainer.data import DataConfig, build_loader
from trainer.eval_passkey import CHANCE, evaluate_during_training, evaluate_passkey, model_predictor, write_result
from trainer.model import GPT, ModelConfig
from trainer.data.tokenizer import ByteTokenizer

from helpers import ROOT
TOK = ByteTokenizer()
KEY_RE = re.compile(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("extra", [0, 1, 57, 700])
def test_needle_is_where_it_says(depth, extra):
    length = passkey.min_length(TOK) + extra
    s = passkey.make_sample(TOK, length, depth, np.random.default_rng(extra))
    needle = np.asarray(TOK.encode(passkey.NEEDLE.format(key=s.key)))
    question = np.asarray(TOK.encode(passkey.QUESTION))
    assert len(s.prompt) == length and s.prompt.dtype == np.int64
    assert np.array_equal(s.prompt[s.needle_start:s.needle_start + s.needle_len], needle)
    assert s.needle_start == round(depth * extra)  # depth is a fraction of the filler before the needle
    assert np.array_equal(s.prompt[-len(question):], question)
    assert re.fullmatch(r"\d{5}", s.key) and TOK.decode(s.answer.tolist()) == s.key
    text = TOK.decode(s.prompt.tolist())
    assert KEY_RE.findall(text) == [s.key]  # exactly one needle, and the filler never mentions a key


def test_generator_errors_and_determinism():
    with pytest.raises(ValueError, match="shorter than needle"):
        passkey.make_sample(TOK, passkey.min_length(TOK) - 1, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="depth"):
        passkey.make_sample(TOK, 200, 1.5, np.random.default_rng(0))
    a = passkey.make_sample(TOK, 300, 0.5, np.random.default_rng(7))
    b = passkey.make_sample(TOK, 300, 0.5, np.random.default_rng(7))
    assert np.array_equal(a.prompt, b.prompt) and a.key == b.key


def oracle(prompts, answers):
    """Reads the key out of each prompt (does not look at `answers`)."""
    keys = [KEY_RE.search(TOK.decode(p.tolist())).group(1) for p in prompts]
    return torch.tensor([TOK.encode(k) for k in keys])


def guesser(seed):
    gen = torch.Generator().manual_seed(seed)
    digits = torch.tensor(TOK.encode("0123456789"))
    return lambda prompts, answers: digits[torch.randint(0, 10, answers.shape, generator=gen)]


def test_oracle_scores_100_and_random_scores_chance():
    lengths, depths = [128, 300], [0.0, 0.5, 1.0]
    perfect = evaluate_passkey(oracle, TOK, lengths, depths, samples=6, seed=0, batch_size=4)
    assert perfect["mean_exact"] == 1.0 and perfect["mean_digit"] == 1.0
    assert np.array(perfect["exact"]).shape == (3, 2)
    rand = evaluate_passkey(guesser(0), TOK, lengths, depths, samples=100, seed=0, batch_size=50)
    # 600 prompts x 5 digits: the per-digit rate is 0.1 +- 0.006 (1 sigma); exact 1e-5 per prompt.
    assert abs(rand["mean_digit"] - CHANCE["digit"]) < 0.03 and rand["mean_exact"] < 0.01
    assert rand["chance"] == {"exact": 1e-5, "digit": 0.1}


def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64),
               attn_backend="reference").eval()


def test_teacher_forcing_is_greedy_decoding():
    # Exact match under teacher forcing == greedy decoding reproduces the key: the digit at step t is the
    # argmax given the true digits before it, which greedy has produced iff it was right so far. Check the
    # predictor against an explicit greedy loop on a random model (whatever it predicts).
    model = tiny_model()
    s = passkey.make_sample(TOK, 120, 0.5, np.random.default_rng(1))
    prompts, answers = torch.from_numpy(s.prompt[None]), torch.from_numpy(s.answer[None])
    pred = model_predictor(model, torch.device("cpu"))(prompts, answers)
    with torch.no_grad():
        tokens, greedy = prompts.clone(), []
        for _ in range(answers.shape[1]):
            nxt = (model(tokens)[:, -1] @ model.output_weight.T).argmax(-1)
            greedy.append(int(nxt))
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    assert int(pred[0, 0]) == greedy[0]
    first_wrong = next((t for t in range(5) if greedy[t] != int(answers[0, t])), 5)
    assert pred[0, :first_wrong + 1].tolist() == greedy[:first_wrong + 1]  # same context up to there


def test_periodic_eval_leaves_the_compiled_training_graph_alone(tmp_path):
    """The trainer's passkey eval runs a compiled model eagerly: no graph is compiled for its prompt lengths (the
    training shape keeps its static graph) and the scores equal an eager model's."""
    from types import SimpleNamespace
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64, compile=True)
    model = GPT(cfg, attn_backend="reference")
    eager = GPT(ModelConfig(**{**cfg.__dict__, "compile": False}), attn_backend="reference")
    eager.load_state_dict(model.state_dict())
    model(torch.randint(0, TOK.vocab_size, (2, 64))).sum().backward()  # a training step's shape compiles
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    ecfg = SimpleNamespace(passkey_lengths=[112, 160], passkey_depths=[0.0, 1.0], passkey_samples=2,
                           passkey_batch_size=2)
    got = evaluate_during_training(model, TOK, ecfg, torch.device("cpu"), None, tmp_path / "a", 1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert model.training  # restored
    want = evaluate_during_training(eager, TOK, ecfg, torch.device("cpu"), None, tmp_path / "b", 1)
    assert got == want


def test_results_json_and_heatmap(tmp_path):
    result = evaluate_passkey(oracle, TOK, [128, 256], [0.0, 1.0], samples=2, seed=0)
    json_path, png_path = write_result(result, tmp_path / "out" / "passkey")
    assert json.loads(json_path.read_text())["mean_exact"] == 1.0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_passkey_documents_mixed_into_training_data():
    cfg = DataConfig(seq_len=256, batch_size=2, max_files=20, passkey_ratio=0.75, passkey_max_len=200)
    store = build_loader(cfg, TOK, "train").store
    plain = build_loader(DataConfig(seq_len=256, batch_size=2, max_files=20), TOK, "train").store
    docs = [TOK.decode(store.tokens[store.doc_offsets[i]:store.doc_offsets[i + 1] - 1].tolist())
            for i in range(plain.num_docs, store.num_docs)]
    assert len(docs) == round(3 * plain.num_docs)  # ratio / (1 - ratio) per corpus document
    for text in docs:
        key = KEY_RE.search(text).group(1)
        assert text.endswith(passkey.QUESTION + key)  # the answer follows the question
        assert passkey.min_length(TOK) + 5 <= len(text) + 0 <= 200 + 5
    with pytest.raises(ValueError, match="passkey_ratio"):
        build_loader(DataConfig(passkey_ratio=1.0), TOK, "train")


def test_log_uniform_lengths_favour_short_documents():
    low, high = passkey.min_length(TOK), 2048
    lengths = {}
    for log in (False, True):
        docs = passkey.passkey_documents(TOK, 400, 0, low, high, np.int64, log_lengths=log)
        again = passkey.passkey_documents(TOK, 400, 0, low, high, np.int64, log_lengths=log)
        assert all(np.array_equal(a, b) for a, b in zip(docs, again))  # deterministic in the seed
        lengths[log] = np.array([len(d) - passkey.KEY_DIGITS - 1 for d in docs])  # the prompt's length
        assert lengths[log].min() >= low and lengths[log].max() <= high
    median = np.sqrt(low * (high + 1))  # of the log-uniform law; a uniform one puts ~20% of documents below it
    assert 0.4 < np.mean(lengths[True] <= median) < 0.6
    assert np.mean(lengths[False] <= median) < 0.3
    assert lengths[True].max() > 1024  # the long end is still drawn


def test_trainer_hook_and_command_line(tmp_path):
    from tests.trainer.test_trainer import train  # the small, fast trainer setup of the trainer tests

    out = tmp_path / "run"
    train(out, "train.steps=4", "train.ckpt_every=4", "eval.passkey_every=2", "eval.passkey_lengths=[128]",
          "eval.passkey_depths=[0.0,1.0]", "eval.passkey_samples=2", "data.passkey_ratio=0.5",
          "data.passkey_max_len=120")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "passkey_exact" in r]
    assert [r["step"] for r in logged] == [2, 4] and all(0 <= r["passkey_digit"] <= 1 for r in logged)
    assert (out / "passkey" / "step_4.json").is_file() and (out / "passkey" / "step_4.png").is_file()
    stem = tmp_path / "cli" / "pk"
    proc = subprocess.run([sys.executable, "-m", "trainer.eval_passkey", f"checkpoint={out}", "lengths=[128,160]",
                           "depths=[0.5]", "samples=3", f"out={stem}", "model.rope_scaling.type=linear",
                           "model.rope_scaling.factor=2.0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["step"] == 4 and result["lengths"] == [128, 160] and result["model_overrides"] == {
        "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert stem.with_suffix(".png").is_file()
