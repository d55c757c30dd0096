"""Perplexity by position: bucket NLL equals full-logits cross_entropy, buckets tile [0, seq_len), each row is one
whole document, JSON + PNG are written, the trainer hook and the CLI (trainer checkpoint, Hugging Face directory)
agree with independent computations."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.data.tokenizer import ByteTokenizer
from trainer.eval.ppl import (bucket_label, default_buckets, evaluate_ppl, resolve_buckets, select_documents,
                              write_result)
from trainer.eval_ppl import main
from trainer.model import GPT, ModelConfig

from helpers import ROOT, save_tiny_bpe_tokenizer

TOK = ByteTokenizer()
CPU = torch.device("cpu")


def tiny_model(backend="auto", **overrides):
    # init_std 0.3: peaked random logits, so per-token losses differ by whole nats and a shifted bucket shows
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      init_std=0.3, **overrides)
    return GPT(cfg, attn_backend=backend).eval()


@torch.no_grad()
def full_logits_nll(model, docs) -> torch.Tensor:
    """(D, N) per-token NLL from the whole [N, vocab] logits and torch's cross_entropy."""
    rows = []
    for row in torch.as_tensor(np.asarray(docs), dtype=torch.long):
        logits = model(row[None, :-1])[0] @ model.output_weight.T  # (N, vocab)
        rows.append(F.cross_entropy(logits, row[1:], reduction="none"))
    return torch.stack(rows).double()


def test_bucket_nll_equals_full_logits_cross_entropy():
    docs = np.random.default_rng(0).integers(0, TOK.vocab_size, (3, 97))  # 3 documents, seq_len 96
    ref = full_logits_nll(tiny_model("reference"), docs)
    assert ref.std() > 0.5  # losses vary by position: a misplaced bucket would not pass by luck
    # chunk 7: the lm head runs over 14 chunks, the last one partial
    got = evaluate_ppl(tiny_model(), docs, [0, 8, 32], CPU, chunk=7, progress=False)
    assert got["buckets"] == [[0, 8], [8, 32], [32, 96]] and got["labels"] == ["0-8", "8-32", "32-96"]
    assert got["tokens"] == [24, 72, 192] and got["tokens_all"] == 288 and got["docs"] == 3
    for (lo, hi), nll, ppl in zip(got["buckets"], got["nll"], got["ppl"]):
        assert nll == pytest.approx(float(ref[:, lo:hi].mean()), abs=1e-5)
        assert ppl == pytest.approx(math.exp(nll), rel=1e-12)
    assert got["nll_all"] == pytest.approx(float(ref.mean()), abs=1e-5)
    # the plotted curve: bins that tile the positions, each its positions' mean
    c = got["curve"]
    assert c["start"][0] == 0 and c["end"][-1] == 96 and c["start"][1:] == c["end"][:-1]
    for a, b, nll in zip(c["start"], c["end"], c["nll"]):
        assert nll == pytest.approx(float(ref[:, a:b].mean()), abs=1e-5)


def test_token_losses_skip_ignored_labels():
    from trainer.model.loss import token_losses

    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (10,))
    labels[[2, 7]] = -100
    want = F.cross_entropy(hidden @ weight.T, labels, reduction="none")  # 0 where ignored
    torch.testing.assert_close(token_losses(hidden, weight, labels, chunk_size=3), want)


def test_bucket_boundaries():
    assert default_buckets(131072) == [0, 4096, 16384, 65536, 131072]
    assert default_buckets(256) == [0, 4, 16, 64, 256]
    assert default_buckets(1000) == [0, 16, 64, 256, 1000]
    assert resolve_buckets([], 256) == [0, 4, 16, 64, 256]
    assert resolve_buckets([0, 4096, 16384, 65536, 1 << 20], 32768) == [0, 4096, 16384, 32768]  # clipped
    assert resolve_buckets([100], 256) == [0, 100, 256]
    for bad in ([16, 4], [-1, 8], [8, 8]):
        with pytest.raises(ValueError, match="buckets must be increasing"):
            resolve_buckets(bad, 256)
    assert bucket_label(4096, 16384) == "4K-16K" and bucket_label(65536, 1 << 20) == "64K-1M"
    assert bucket_label(0, 1000) == "0-1000"


def test_each_row_is_one_whole_document():
    texts = ["short", "a" * 150, "tiny", "b" * 99 + "c" * 120, "d" * 500]
    docs = select_documents(texts, TOK, 100, count=2)
    assert docs.shape == (2, 101) and docs.dtype == np.int64
    assert TOK.decode(docs[0].tolist()) == "a" * 101  # documents are never packed together
    assert TOK.decode(docs[1].tolist()) == "b" * 99 + "cc"
    with_bos = select_documents(texts, TOK, 100, count=1, bos=True)
    assert with_bos[0, 0] == TOK.bos_id and TOK.decode(with_bos[0, 1:].tolist()) == "a" * 100
    assert len(select_documents(texts, TOK, 100, count=10)) == 3  # fewer found: a warning, not an error
    with pytest.raises(ValueError, match=r"none of the 5 documents has seq_len \+ 1 = 1001 tokens \(the longest "
                                         r"has 500\)"):
        select_documents(texts, TOK, 1000, count=1, source="data.path='x'")


def test_json_and_png(tmp_path):
    docs = np.random.default_rng(1).integers(0, TOK.vocab_size, (1, 65))
    result = evaluate_ppl(tiny_model(), docs, [], CPU, progress=False)
    json_path, png_path = write_result(result, tmp_path / "out" / "ppl")
    back = json.loads(json_path.read_text())
    assert back["boundaries"] == [0, 4, 16, 64] and back["ppl"] == result["ppl"] and back["seq_len"] == 64
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A 2-step tiny training run with the perplexity eval at both steps."""
    from tests.trainer.test_trainer import train  # the small, fast trainer setup of the trainer tests

    out = tmp_path_factory.mktemp("run2")
    train(out, "train.steps=2", "train.ckpt_every=2", "eval.ppl_every=1", "eval.ppl_docs=2",
          "eval.ppl_buckets=[0,8,32]")
    return out


def test_trainer_hook_writes_metrics(run2):
    records = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "ppl" in r}
    assert sorted(logged) == [1, 2]
    for r in logged.values():
        assert {"ppl_0_8", "ppl_8_32", "ppl_32_64"} <= set(r) and 1 < r["ppl"] < 2 * TOK.vocab_size
    saved = json.loads((run2 / "ppl" / "step_2.json").read_text())
    assert saved["step"] == 2 and saved["docs"] == 2 and saved["seq_len"] == 64  # data.seq_len
    assert saved["ppl_all"] == pytest.approx(logged[2]["ppl"], rel=1e-12)
    assert (run2 / "ppl" / "step_2.png").is_file()


def test_cli_on_a_checkpoint(run2, tmp_path):
    stem = tmp_path / "cli"
    args = [f"checkpoint={run2}", "seq_len=64", "docs=2", "buckets=[0,8,32]", "progress=false"]
    got = main([*args, f"out={stem}"])
    logged = json.loads((run2 / "ppl" / "step_2.json").read_text())  # the trainer's eval of the same weights
    assert got["ppl"] == pytest.approx(logged["ppl"], rel=1e-5) and got["step"] == 2
    assert json.loads(stem.with_suffix(".json").read_text())["checkpoint"].endswith("step_2")
    assert stem.with_suffix(".png").is_file()

    # A RoPE override changes the model that is evaluated, and only that.
    state = torch.load(run2 / "checkpoints" / "step_2" / "state.pt", weights_only=False)
    linear2 = {"type": "linear", "factor": 2.0}
    scaled = GPT(ModelConfig(**{**state["config"]["model"], "rope_scaling": linear2})).eval()
    scaled.load_state_dict(state["model"])
    docs = np.stack([np.asarray(r) for r in _val_docs(run2, 64, 2)])
    want = evaluate_ppl(scaled, docs, [0, 8, 32], CPU, progress=False)
    got = main([*args, "model.rope_scaling.type=linear", "model.rope_scaling.factor=2", f"out={tmp_path / 'lin'}"])
    assert got["model_overrides"] == {"rope_scaling": linear2}
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5) and got["ppl"] != pytest.approx(logged["ppl"])

    # Documents from a file: every long-enough document of it, in order.
    lines = ["x" * 40, "def f():\n    return 1\n" * 8, "y" * 300]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    got = main([*args, f"data.path={path}", "docs=5", f"out={tmp_path / 'file'}"])
    model = GPT(ModelConfig(**state["config"]["model"])).eval()
    model.load_state_dict(state["model"])
    want = evaluate_ppl(model, select_documents(lines, TOK, 64, 5), [0, 8, 32], CPU, progress=False)
    assert got["docs"] == 2 and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    # A .txt file is one document (not one per line).
    text = "first line\n" + "\n".join(lines)
    (tmp_path / "long.txt").write_text(text)
    got = main([*args, f"data.path={tmp_path / 'long.txt'}", f"out={tmp_path / 'txt'}"])
    want = evaluate_ppl(model, select_documents([text], TOK, 64, 1), [0, 8, 32], CPU, progress=False)
    assert got["docs"] == 1 and got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def _val_docs(run_dir, seq_len, count):
    from trainer.data import DataConfig
    from trainer.eval.ppl import load_documents

    saved = torch.load(run_dir / "checkpoints" / "step_2" / "state.pt", weights_only=False)["config"]["data"]
    return load_documents(DataConfig(**saved), TOK, seq_len, count)


def test_cli_errors(run2, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(key in text for key in ("checkpoint", "hf", "seq_len", "docs", "buckets", "data.path", "model."))
    with pytest.raises(ValueError, match="exactly one of checkpoint="):
        main(["docs=2"])
    with pytest.raises(ValueError, match="bad argument"):
        main([f"checkpoint={run2}", "doc=2"])
    with pytest.raises(ValueError, match=r"model overrides \{'rope_sclaing': 2\}"):
        main([f"checkpoint={run2}", "model.rope_sclaing=2"])
    with pytest.raises(ValueError, match=r"does not fit the model built with overrides \{'dim': 96\}: .*shape \(checkpoint, model\) \{'\S+': \("):
        main([f"checkpoint={run2}", "model.dim=96"])
    with pytest.raises(ValueError, match="none of the .* documents has seq_len"):
        main([f"checkpoint={run2}", "seq_len=1000000", "progress=false"])
    with pytest.raises(ValueError, match="buckets must be increasing"):
        main([f"checkpoint={run2}", "buckets=[8,4]"])
    # From the shell: one line naming the argument, no trace.
    proc = subprocess.run([sys.executable, "-m", "trainer.eval_ppl", f"checkpoint={tmp_path / 'nothing'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("eval_ppl: checkpoint=") and len(proc.stderr.strip().splitlines()) == 1


def _save_tiny_llama(path, max_pos: int, rope_parameters=None):
    """A random LlamaForCausalLM with a byte-level BPE tokenizer that puts <s> in front (as Llama's does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_tiny_bpe_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      **({"rope_parameters": rope_parameters} if rope_parameters else {}))
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model, tok


def _hf_bucket_nll(model, tok, texts, seq_len, bounds):
    """Per-bucket mean NLL from the Hugging Face model's own logits, on its tokenizer's own ids (with <s>)."""
    rows = [ids[:seq_len + 1] for ids in tok(texts)["input_ids"] if len(ids) > seq_len]
    with torch.no_grad():
        ids = torch.tensor(rows)
        logits = model(ids[:, :-1]).logits  # (D, N, vocab)
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(rows), -1)
    return len(rows), [float(nll[:, lo:hi].mean()) for lo, hi in zip(bounds, bounds[1:])]


def test_cli_on_a_hugging_face_directory(tmp_path):
    pytest.importorskip("trainer.model.hf")
    texts = ["import os\n" * 60, "short", "def f(self):\n    return lambda x: x\n" * 20, "class A: yield\n" * 40]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model, tok = _save_tiny_llama(tmp_path / "llama", max_pos=64)
    got = main([f"hf={tmp_path / 'llama'}", f"data.path={data}", "docs=4", "buckets=[0,8,32]", "progress=false",
                f"out={tmp_path / 'out'}"])
    docs, want = _hf_bucket_nll(model, tok, texts, 64, [0, 8, 32, 64])
    assert got["seq_len"] == 64 and got["docs"] == docs == 3 and got["bos"] is True  # max_position_embeddings
    assert got["nll"] == pytest.approx(want, abs=1e-4)
    assert (tmp_path / "out.png").is_file()

    # A YaRN override evaluates the scaled RoPE without training: the same as a checkpoint saved with it.
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    scaled, _ = _save_tiny_llama(tmp_path / "llama_yarn", max_pos=128, rope_parameters=yarn)
    got = main([f"hf={tmp_path / 'llama'}", f"data.path={data}", "seq_len=128", "buckets=[0,64]", "progress=false",
                "model.rope_scaling.type=yarn", "model.rope_scaling.factor=2", f"out={tmp_path / 'yarn'}"])
    docs, want = _hf_bucket_nll(scaled, tok, texts, 128, [0, 64, 128])
    assert got["docs"] == docs == 3 and got["nll"] == pytest.approx(want, abs=1e-4)
    assert got["nll"] != pytest.approx(_hf_bucket_nll(model, tok, texts, 128, [0, 64, 128])[1], abs=1e-3)
