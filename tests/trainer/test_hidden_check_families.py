"""DESIGN.md's hidden check for every family it names: a tiny random checkpoint written by transformers (with a
tokenizer and generation_config) -> 2 steps of `python -m trainer.train model=hf model.path=DIR data=hf
data.path=corpus.jsonl data.tokenizer=hf train.device=cpu` at `optim.lr=1e-9 optim.min_lr=1e-10` ->
`python -m trainer.export RUN_DIR --out DIR` -> AutoModelForCausalLM.from_pretrained(DIR).

Families: Llama with GQA and tied embeddings, Llama with llama3 RoPE scaling, Mistral with a sliding window, Qwen2
with q/k/v biases, Qwen3 with q/k norms and an explicit head_dim. Each vocabulary is exactly the tokenizer's, so a
tokenizer class that adds a token of its own (Qwen2's pad <|endoftext|>) is met as a user meets it. Qwen2 runs the
real command line with every default (data.seq_len 2048, warmup, validation); the others run in this process at
data.seq_len=64 with the other defaults.

Oracles: the source's safetensors keys; its weights rounded to bf16 (2 warmup steps at lr 1e-9 move them
~1e-10); its config.json (family, architectures, RoPE, window, tying, head_dim, attention_bias); transformers'
logits on the export vs our GPT's on the same weights (fp32, 1e-4) and vs the source model's (bf16 rounding).
"""

import json
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT
from test_export import (BF16_REL, ENV, HF_RUN, PY, WORDS, assert_rel, hf_logits, our_logits, save_tokenizer,
                         tensors)
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, check_model_vocab
from trainer.export import main as export_main
from trainer.model.hf import build_pretrained, config_from_hf
from trainer_utils import train_one_process

LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
FAMILIES = {  # name: (transformers config class, its family-specific arguments)
    "llama_gqa_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=LLAMA3, max_position_embeddings=128)),
    "mistral_window": ("MistralConfig", dict(sliding_window=16)),
    "qwen2_qkv_bias": ("Qwen2Config", dict(attention_bias=True)),  # a key Qwen2's modeling never reads
    "qwen3_qk_norm": ("Qwen3Config", dict(head_dim=32)),
}
CLI_FAMILY = "qwen2_qkv_bias"  # through the real command lines, every default kept
SEQ_LEN = 64  # the in-process runs; tokens below reach past the window (16) and llama3's original context (16)
SAME_CONFIG_EXCEPT = {"dtype", "torch_dtype", "transformers_version"}


def make_source(family: str, path):
    """The family's tiny random model, its tokenizer and generation_config in `path`; returns the vocab size.
    Norm gains and biases are random too, so a misplaced q/k norm or bias changes the logits."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = save_tokenizer(path)
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, temperature=0.7,
                     do_sample=True).save_pretrained(path)
    return len(tok)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    rows = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=gen))
            for n in torch.randint(5, 60, (60,), generator=gen)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def train_and_export(family: str, src, corpus, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    args = [*HF_RUN, f"model.path={src}", f"data.path={corpus}"]
    if family != CLI_FAMILY:
        train_one_process([*args, f"data.seq_len={SEQ_LEN}"], run)
        export_main([str(run), "--out", str(out)])
        return out
    for cmd in (["trainer.train", *args, f"train.out_dir={run}"], ["trainer.export", str(run), "--out", str(out)]):
        proc = subprocess.run([PY, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = OmegaConf.load(run / "config.yaml")  # the defaults the command line left in place
    assert (cfg.data.seq_len, cfg.optim.warmup_steps, cfg.train.eval_batches) == (2048, 30, 8)
    return out


def assert_config_kept(src, out):
    want = json.loads((src / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    assert (got.get("dtype") or got.get("torch_dtype")) == "bfloat16"
    for key, value in want.items():
        if key in SAME_CONFIG_EXCEPT:
            continue
        if key == "head_dim" and value is None:  # the class's hidden_size / heads, written out
            assert got[key] == want["hidden_size"] // want["num_attention_heads"]
            continue
        assert got.get(key) == value, (key, got.get(key), value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hidden_check(family, corpus, tmp_path):
    src = tmp_path / "src"
    vocab = make_source(family, src)
    out = train_and_export(family, src, corpus, tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    assert_config_kept(src, out)  # model_type, architectures, RoPE, sliding_window, tying, head_dim, ...
    want, got = tensors(src), tensors(out)
    assert sorted(got) == sorted(want)  # no second lm_head when tied, the q/k/v biases and q/k norms present
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.allclose(got[k].float(), w, rtol=BF16_REL, atol=1e-8), k
    tokens = torch.randint(vocab, (2, 48), generator=torch.Generator().manual_seed(2))
    reloaded = hf_logits(out, tokens)  # asserts no missing / unexpected / mismatched keys
    ours = build_pretrained(config_from_hf(out))
    assert_rel(reloaded, our_logits(ours, tokens), 1e-4, "transformers vs ours on the export")
    # the source model, up to the bf16 rounding of its weights (~4e-3 here)
    assert_rel(reloaded, hf_logits(src, tokens), 2e-2, "the export vs the source, in transformers")


def test_added_tokens_past_the_model_vocab(tmp_path):
    """An HF tokenizer longer than the model's vocabulary by added tokens (not bos / eos) trains; a text that
    spells one of them is refused by name instead of indexing past the embedding."""
    from transformers import AutoTokenizer

    tok = save_tokenizer(tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(tmp_path)
    loaded = HFTokenizer(str(tmp_path))
    base = len(tok) - 1
    assert loaded.vocab_size == len(AutoTokenizer.from_pretrained(str(tmp_path))) == base + 1
    check_model_vocab(loaded, base)
    assert loaded.encode("def return") == tok("def return", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"'<\|extra\|>' \(id 300\).*model.vocab_size 300"):
        loaded.encode_batch(["def <|extra|> return"])
    with pytest.raises(ValueError, match="data.tokenizer has 301 tokens, more than model.vocab_size \\(299\\)"):
        check_model_vocab(HFTokenizer(str(tmp_path)), base - 1)  # a base-vocabulary token has no embedding
    with pytest.raises(ValueError, match="data.tokenizer has 258 tokens"):
        check_model_vocab(ByteTokenizer(), 257)
