"""Hugging Face checkpoints through the trainer and back out: trainer.export, train.export_hf, the extension
recipes and scripts/bench_load.py, on CPU with tiny random checkpoints written by transformers itself.

- round trip (DESIGN.md's hidden check): transformers' tiny Llama + a real tokenizer in one dir -> 2 steps of
  `python -m trainer.train model=hf ... data.tokenizer=hf` at lr 1e-9 -> `python -m trainer.export` ->
  AutoModelForCausalLM.from_pretrained: no missing / unexpected keys, the source's keys, weights within bf16
  rounding of the source, logits equal to our model's on the exported weights (fp32) and, with an fp32 export, to
  the trained model of the checkpoint
- distributed: cp=2 under ZeRO-3 on 2 gloo ranks builds the model partitioned (deepspeed.zero.Init), loads the
  weights the one-process run loads (same first loss),
  and its export (gathered from the ZeRO-3 shard files, train.export_hf) equals the one-process export
- bad input names the path; --help; the recipes compose and pass check_config; bench_load --shape tiny
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import ROOT, save_tiny_bpe_tokenizer
from trainer.config import check_config
from trainer.data import DataConfig, build_tokenizer
from trainer.data.tokenizer import encode_documents
from trainer.export import export_checkpoint, find_checkpoint, model_config, parse_size
from trainer.export import main as export_main
from trainer.model.hf import build_pretrained, config_from_hf
from trainer_utils import compose_cfg, train_one_process

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BF16_REL = 2.0**-8  # bf16 keeps 8 significant bits: round to nearest is within half of 2^-7 relative
# the hidden check's command line, plus a short context and no evaluation so it runs in seconds
HF_RUN = ["model=hf", "data=hf", "data.tokenizer=hf", "train.device=cpu", "train.steps=2", "optim.lr=1e-9",
          "optim.min_lr=1e-10"]
FAST = ["data.seq_len=64", "data.batch_size=4", "train.eval_batches=0", "train.log_every=1",
        "optim.warmup_steps=1"]
WORDS = ("def return import class self lambda yield while for in if else try except with as pass break "
         "continue global assert").split()


def save_tokenizer(path: Path):
    """A byte-level BPE tokenizer whose encoding starts with <s>, as Llama's does, saved as transformers would."""
    return save_tiny_bpe_tokenizer(path, " ".join(WORDS))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Tiny random Llama (GQA, llama3 RoPE scaling; vocab 2048 so ZeRO-3 really partitions the embedding and head),
    its tokenizer and generation_config in one dir, and a jsonl corpus."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    src = root / "llama"
    tok = save_tokenizer(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32))
    LlamaForCausalLM(config).save_pretrained(src)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, temperature=0.7,
                     do_sample=True).save_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    rows = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=gen))
            for n in torch.randint(5, 60, (60,), generator=gen)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return src, root / "corpus.jsonl"


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens) @ model.output_weight.T


def hf_logits(directory, tokens):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model(tokens).logits


def assert_rel(got, want, tol, what):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"{what}: max relative error {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="module")
def run(source, tmp_path_factory):
    """The hidden check's training command, through the CLI."""
    src, corpus = source
    out = tmp_path_factory.mktemp("run")
    args = [PY, "-m", "trainer.train", *HF_RUN, f"model.path={src}", f"data.path={corpus}", *FAST,
            f"train.out_dir={out}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_round_trip_through_trainer_and_transformers(source, run, tmp_path):
    src, _ = source
    out = tmp_path / "exported"
    export_main([str(run), "--out", str(out)])  # python -m trainer.export RUN --out DIR, in this process
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 64  # the trained data.seq_len, longer than the source's 48
    want, got = tensors(src), tensors(out)
    assert sorted(got) == sorted(want)  # same keys as the source: no second lm_head, nothing missing
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16
        # bf16 rounding, plus what 2 AdamW steps at lr 1e-9 moved (~1e-9 per step; it shows on the tiniest weights)
        assert torch.allclose(got[k].float(), w, rtol=BF16_REL, atol=1e-8), k
    tokens = torch.randint(2048, (2, 48))
    ours = build_pretrained(config_from_hf(out))  # fp32, the exported bf16 values
    assert_rel(hf_logits(out, tokens), our_logits(ours, tokens), 1e-4, "transformers vs ours on the export")
    # an fp32 export is the trained model itself: transformers reproduces its logits
    exact = export_checkpoint(run, tmp_path / "fp32", dtype=torch.float32)
    trained = build_pretrained(config_from_hf(src))
    state = torch.load(find_checkpoint(run) / "state.pt", weights_only=False)
    trained.load_state_dict(state["model"])
    assert_rel(hf_logits(exact, tokens), our_logits(trained, tokens), 1e-4, "transformers vs the trained model")


def test_packer_starts_documents_with_the_tokenizers_bos(source):
    tok = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(source[0])))
    ids = tok.encode("def return")
    assert tok.add_bos and encode_documents(tok, ["def return"])[0].tolist() == [tok.bos_id, *ids, tok.eos_id]
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_zero3_cp2_loads_and_exports_as_one_process(source, tmp_path, free_port):
    """2 gloo ranks, cp=2 (each holds half of every sequence) under ZeRO-3 (each holds half of every large
    parameter) vs one process over the same batches, at a learning rate that moves the weights."""
    src, corpus = source
    common = [*HF_RUN, f"model.path={src}", f"data.path={corpus}", *FAST, "optim.lr=1e-3", "optim.min_lr=1e-3",
              "train.export_hf=true"]
    train_one_process(common, tmp_path / "single")
    args = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}", "-m",
            "trainer.train", *common, "parallel.cp=2", "parallel.zero_stage=3", f"train.out_dir={tmp_path / 'z3'}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "model built partitioned (ZeRO-3)" in proc.stdout + proc.stderr  # never whole on a rank
    step = find_checkpoint(tmp_path / "z3")
    assert (step / "zero").is_dir() and "model" not in torch.load(step / "state.pt", weights_only=False)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").open())}
              for d in ("single", "z3")]
    assert abs(losses[0][1] - losses[1][1]) <= 1e-5, losses  # step 1 runs on the loaded weights
    want = tensors(export_checkpoint(tmp_path / "single", tmp_path / "single_fp32", dtype=torch.float32))
    got = tensors(export_checkpoint(tmp_path / "z3", tmp_path / "z3_fp32", dtype=torch.float32))
    source_weights = tensors(src)
    assert sorted(got) == sorted(want) == sorted(source_weights)
    for k in want:
        moved = (want[k] - source_weights[k]).abs().max().item()
        diff = (got[k] - want[k]).abs().max().item()
        assert moved > 1e-4 and diff <= 1e-2 * moved, (k, diff, moved)  # they agree far below how far they moved
    # train.export_hf wrote the same bf16 directory the CLI writes from that checkpoint
    cli = tensors(export_checkpoint(tmp_path / "z3", tmp_path / "z3_bf16"))
    at_end = tensors(tmp_path / "z3" / "hf")
    assert all(torch.equal(at_end[k], cli[k]) for k in cli) and sorted(at_end) == sorted(cli)
    assert (tmp_path / "z3" / "hf" / "tokenizer.json").is_file()


def test_bad_input_names_the_path(tmp_path, capsys):
    with pytest.raises(ValueError, match=str(tmp_path / "missing")):
        find_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}.*not a complete checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("5 bananas")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(SystemExit) as exc:  # the CLI: that message alone, exit status 1
        export_main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert str(tmp_path / "empty") in str(exc.value.code) and "\n" not in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        export_main(["--help"])
    assert exc.value.code == 0
    helped = capsys.readouterr().out
    assert all(word in helped for word in ("RUN_OR_STEP_DIR", "--out", "--dtype", "--max-shard-size")), helped


YARN_16X = dict(type="yarn", factor=16.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("scaling,seq_len,want", [(dict(type="none"), 4096, 4096),  # the trained context
                                                   (YARN_16X, 65536, 131072)])  # YaRN's own: factor x original
def test_exported_max_position_embeddings(scaling, seq_len, want):
    run_cfg = {"model": {"name": "hf", "vocab_size": 320, "max_position_embeddings": 2048, "rope_scaling": scaling},
               "data": {"seq_len": seq_len}}
    assert model_config(run_cfg).max_position_embeddings == want


@pytest.mark.parametrize("experiment", ["extend_hf_1gpu", "extend_llama3_8b_128k"])
def test_extension_recipes_compose(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", f"model.path={tmp_path}", "data.path=/data/long.jsonl"])
    check_config(cfg)
    assert cfg.run_name == experiment and cfg.model.path == str(tmp_path) and cfg.data.tokenizer == "hf"
    assert cfg.data.seq_len == 131072 and cfg.train.export_hf and cfg.optim.lr == 2e-5 == cfg.optim.min_lr
    rs = cfg.model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_position_embeddings) == ("yarn", 16.0, 8192)
    assert cfg.optim.warmup_steps == 20 and cfg.optim.weight_decay == 0.0 and cfg.model.ckpt == "selective"
    if experiment == "extend_llama3_8b_128k":
        assert (cfg.parallel.cp, cfg.parallel.zero_stage) == (8, 3)
    else:
        assert cfg.parallel.cp == 1 and cfg.model.offload_activations == "attention"


def test_bench_load_tiny_on_cpu(tmp_path):
    from scripts import bench_load

    result = bench_load.main(["--shape", "tiny", "--device", "cpu", "--dir", str(tmp_path / "ckpt"),
                              "--out", str(tmp_path / "bench")])
    rows = {r["loader"]: r for r in result["rows"]}
    assert set(rows) == {"ringflash", "transformers"} and result["weights_match"]
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 kv heads of 16); SwiGLU; norms
    assert rows["ringflash"]["params"] == rows["transformers"]["params"] == 2 * 512 * 64 + 2 * per_layer + 64
    assert all(r["peak_rss_gib"] >= r["rss_before_gib"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "bench" / "load.json").read_text())["rows"] == result["rows"]
