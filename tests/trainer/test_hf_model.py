"""Hugging Face checkpoints in and out (trainer/model/hf.py, rope.py): logits parity with transformers' own models
for every family and RoPE scaling type, including packed documents and sequences past the pretraining length; the
round trip load -> train step -> export -> from_pretrained; one clear error for each bad input; model=hf in the
trainer. Tiny random checkpoints are written by transformers' classes into tmp_path (no network)."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from trainer.model import GPT, ModelConfig, RopeScalingConfig
from trainer.model.hf import build_pretrained, config_from_hf, load_hf_weights, save_hf, to_hf_state_dict
from trainer.model.rope import attention_scaling, inv_freq
from trainer_utils import train_one_process

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=32, rms_norm_eps=1e-5)
SEQ = 64  # longer than every original_max_position_embeddings below
ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
FAMILIES = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_untied_mha": ("llama", dict(num_key_value_heads=4)),
    "mistral_window": ("mistral", dict(sliding_window=8)),
    "qwen2_bias_window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3_qknorm_head_dim": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
}


def write_checkpoint(path, model_type="llama", rope=None, shard_size=None, **overrides):
    """A random transformers model saved to `path`; norms and biases perturbed so that none is the identity."""
    kw = {**TINY, **overrides}
    kw["rope_parameters"] = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return path


def hf_logits(path, tokens, position_ids=None):
    # A fresh model per call: dynamic RoPE keeps state across calls in transformers
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval() if not hasattr(
        path, "config") else path
    with torch.no_grad():
        return hf(tokens, position_ids=position_ids, use_cache=False).logits


def our_logits(model, tokens, position_ids=None, cu=None, max_seqlen=None):
    with torch.no_grad():
        return model(tokens, position_ids, cu, max_seqlen) @ model.output_weight.T


def assert_rel_close(got, want, what, tol=1e-4):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def packed_inputs(lengths=(20, 44)):
    tokens = torch.randint(0, TINY["vocab_size"], (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, pos, cu, max(lengths)


def check_parity(path):
    model = build_pretrained(config_from_hf(path), attn_backend="reference")
    if model.config.rope_scaling.type != "dynamic":  # one transformers model serves both inputs
        path = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    torch.manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (2, SEQ))
    assert_rel_close(our_logits(model, tokens), hf_logits(path, tokens), "one sequence per row")
    tokens, pos, cu, mx = packed_inputs()
    assert_rel_close(our_logits(model, tokens, pos, cu, mx), hf_logits(path, tokens, pos), "packed documents")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_per_family(tmp_path, family):
    model_type, overrides = FAMILIES[family]
    model = check_parity(write_checkpoint(tmp_path, model_type, **overrides))
    assert model.config.hf_model_type == model_type


@pytest.mark.parametrize("rope_type", ROPE)
def test_logits_match_transformers_per_rope_type(tmp_path, rope_type):
    # dynamic scales against max_position_embeddings: 16 here, so both inputs run past it
    extra = {"max_position_embeddings": 16} if rope_type == "dynamic" else {}
    model = check_parity(write_checkpoint(tmp_path, "llama", ROPE[rope_type], **extra))
    assert model.config.rope_scaling.type == rope_type


@pytest.mark.parametrize("rope", [ROPE["yarn"], {**ROPE["yarn"], "attention_factor": 1.3, "beta_fast": 16.0},
                                  {**ROPE["yarn"], "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
                                  ROPE["llama3"], ROPE["linear"]])
def test_frequencies_and_attention_factor_match_transformers(rope):
    hf = AutoConfig.for_model("llama", **{**TINY, "max_position_embeddings": 64,
                                          "rope_parameters": {"rope_theta": 500000.0, **rope}})
    want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    ours = config_from_hf_dict(hf)
    got = inv_freq(16, 500000.0, ours.rope_scaling, device="cpu")
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
    assert math.isclose(attention_scaling(ours.rope_scaling), want_scale, rel_tol=1e-12)


def config_from_hf_dict(hf):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return config_from_hf(d)


def test_export_round_trip_after_a_training_step(tmp_path):
    src = write_checkpoint(tmp_path / "src", "qwen2", ROPE["llama3"], shard_size="60KB", use_sliding_window=True,
                           sliding_window=8, max_window_layers=1)
    assert (src / "model.safetensors.index.json").is_file()  # the sharded layout is what was loaded
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    cfg = config_from_hf(src)
    model = build_pretrained(cfg, attn_backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 128, (2, 33))
    logits = model(tokens[:, :-1]) @ model.output_weight.T
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    assert all((model.state_dict()[k] - v).abs().max() > 0 for k, v in before.items())
    cfg.max_position_embeddings = 256  # the extended context a trainer would record
    out = save_hf(model.state_dict(), cfg, tmp_path / "out", source_dir=src, dtype=torch.float32,
                  max_shard_size=40_000)
    shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    written = json.loads((out / "config.json").read_text())
    assert written["max_position_embeddings"] == 256 and written["model_type"] == "qwen2"
    assert written["rope_parameters"]["rope_type"] == "llama3"
    assert written["rope_parameters"]["original_max_position_embeddings"] == 16
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").is_file()
    tokens, pos, cu, mx = packed_inputs()
    assert_rel_close(our_logits(model, tokens, pos, cu, mx), hf_logits(out, tokens, pos), "exported, packed")
    again = build_pretrained(config_from_hf(out), attn_backend="reference")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_tied_bf16_export(tmp_path):
    src = write_checkpoint(tmp_path / "src", "qwen3", head_dim=32, tie_word_embeddings=True)
    model = build_pretrained(config_from_hf(src), attn_backend="reference")
    hf_names = to_hf_state_dict(model.state_dict(), model.config)
    assert "lm_head.weight" not in hf_names and "model.layers.1.self_attn.k_norm.weight" in hf_names
    out = save_hf(model.state_dict(), model.config, tmp_path / "bf16")
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.embed_tokens.weight.float(), model.tok_embeddings.weight.bfloat16().float())



@pytest.mark.parametrize("rope_type", ["none", *ROPE])
def test_from_scratch_model_exports_as_llama_per_rope_type(tmp_path, rope_type):
    torch.manual_seed(3)
    scaling = RopeScalingConfig(rope_type, 4.0, 16)
    scratch = GPT(ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                              rope_scaling=scaling, max_position_embeddings=64), attn_backend="reference")
    out = save_hf(scratch.state_dict(), scratch.config, tmp_path, dtype=torch.float32)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    # dynamic NTK scales against max_position_embeddings itself: the export keeps the pretraining length there
    assert written["max_position_embeddings"] == (16 if rope_type == "dynamic" else 64)
    tokens = torch.randint(0, 128, (1, 40))
    assert_rel_close(our_logits(scratch, tokens), hf_logits(out, tokens), f"from-scratch export, {rope_type}")
    back = config_from_hf(out).rope_scaling
    if rope_type in ("none", "linear"):  # no pretraining length in these types (nor a factor in none)
        assert (back.type, back.factor) == (rope_type, 1.0 if rope_type == "none" else 4.0)
    else:
        assert back == scratch.config.rope_scaling


def test_rope_overrides_from_base(tmp_path):
    src = write_checkpoint(tmp_path, "llama", ROPE["llama3"], max_position_embeddings=64)
    base = ModelConfig(name="hf", ckpt="full", rope_theta=0, rope_scaling=RopeScalingConfig(type=""))
    kept = config_from_hf(src, base)
    assert kept.ckpt == "full" and kept.rope_theta == 10000.0 and kept.rope_scaling == RopeScalingConfig(
        "llama3", 8.0, 16, low_freq_factor=1.0, high_freq_factor=4.0)
    assert config_from_hf(src, ModelConfig(rope_theta=0, rope_scaling=RopeScalingConfig("", factor=16.0))
                          ).rope_scaling.factor == 16.0  # one field on top of the checkpoint's type
    yarn = config_from_hf(src, ModelConfig(rope_theta=5e5, rope_scaling=RopeScalingConfig("yarn", 8.0)))
    assert yarn.rope_theta == 5e5 and yarn.rope_scaling.type == "yarn"
    assert yarn.rope_scaling.original_max_position_embeddings == 64  # the checkpoint's context
    legacy = json.loads((src / "config.json").read_text())  # transformers 4 keys: rope_scaling + rope_theta
    del legacy["rope_parameters"]
    legacy.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    (src / "config.json").write_text(json.dumps(legacy))
    old = config_from_hf(src)
    assert old.rope_theta == 5e5 and old.rope_scaling.type == "linear" and old.rope_scaling.factor == 2.0
    plain = write_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="name model.rope_scaling.type"):  # a factor alone would be ignored
        config_from_hf(plain, ModelConfig(rope_theta=0, rope_scaling=RopeScalingConfig("", factor=8.0)))


def test_bad_inputs_name_the_file_or_key(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        config_from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        config_from_hf(tmp_path / "empty")
    AutoConfig.for_model("mixtral", **TINY).save_pretrained(tmp_path / "moe")
    with pytest.raises(ValueError, match="model_type='mixtral'"):
        config_from_hf(tmp_path / "moe")
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16,
                "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    AutoConfig.for_model("llama", **{**TINY, "rope_parameters": longrope}).save_pretrained(tmp_path / "lr")
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        config_from_hf(tmp_path / "lr")
    AutoConfig.for_model("llama", **{**TINY, "hidden_act": "gelu"}).save_pretrained(tmp_path / "gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf(tmp_path / "gelu")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        build_pretrained(config_from_hf(_copy_config(tmp_path)))

    sharded = write_checkpoint(tmp_path / "sharded", shard_size="60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    with pytest.raises(ValueError, match=victim):
        build_pretrained(config_from_hf(sharded))

    src = write_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    cfg_json = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg_json, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="missing keys \\['lm_head.weight'\\]"):
        build_pretrained(config_from_hf(src))
    (src / "config.json").write_text(json.dumps({**cfg_json, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="shape mismatch for model.layers.0.mlp.gate_proj.weight.*\\(128, 64\\).*"
                                         "\\(96, 64\\)"):
        build_pretrained(config_from_hf(src))


def _copy_config(tmp_path):
    # a directory with a valid config.json and no weights
    d = tmp_path / "noweights"
    d.mkdir()
    AutoConfig.for_model("llama", **TINY).save_pretrained(d)
    return d


def test_trainer_runs_model_hf(tmp_path):
    src = write_checkpoint(tmp_path / "src", "qwen2", ROPE["yarn"], vocab_size=300)
    out = tmp_path / "run"
    train_one_process(["data.tokenizer=byte", "train.device=cpu", "train.steps=2", "data.seq_len=32",
                       "data.batch_size=2", "train.eval_batches=1", "train.log_every=1", "optim.lr=1e-9",
                       "optim.min_lr=1e-10", "optim.warmup_steps=0"], out, "model=hf", f"model.path={src}",
                      "model.rope_scaling.factor=2.0")
    saved = torch.load(next((out / "checkpoints").glob("step_2")) / "state.pt", weights_only=False)
    cfg = saved["config"]["model"]
    assert cfg["hf_model_type"] == "qwen2" and cfg["vocab_size"] == 300 and cfg["qkv_bias"]
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 2.0
    reference = GPT(config_from_hf(src), attn_backend="reference")
    load_hf_weights(reference, src)
    for k, v in reference.state_dict().items():  # lr 1e-9: the weights are the checkpoint's
        torch.testing.assert_close(saved["model"][k], v, rtol=0, atol=1e-6)
