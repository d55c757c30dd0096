"""ZeRO-3 loading of a Hugging Face checkpoint (build_pretrained(..., zero_init=zero3_init(...))): the GPT is
built partitioned and filled one gathered parameter at a time, on 2 gloo ranks with tiny random Llamas (tied and
untied lm head) written by transformers.

- every parameter is partitioned after the build: its local tensor is empty and its shard holds
  ceil(numel / 2) elements; while loading, at most one parameter is whole at a time
- gathered back, every parameter equals the checkpoint's tensor exactly
- the DeepSpeed engine over that model gives the loss of the one-process model on the same batch (1e-5)

The trainer path (train.py model=hf parallel.zero_stage=3) runs in test_export.py's
test_zero3_cp2_loads_and_exports_as_one_process.
"""

import os
from pathlib import Path

import pytest
import torch

from dist_utils import run_world
from trainer.loop import LMLoss
from trainer.model.hf import build_pretrained, config_from_hf

WORLD = 2
CHUNK = 32  # loss chunk (tokens)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def source(request, tmp_path_factory):
    """A tiny random Llama; vocab 512 x dim 64 so the embedding is the largest parameter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=request.param)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(512, (WORLD, 33), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _worker(rank, world_size, src, out):
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from parallel.data_parallel import init_zero_engine, zero3_init, zero_config

    cpu = torch.device("cpu")
    # threshold 0: no parameter stays whole for being small, so every one must show as a shard
    config = zero_config(3, micro_batch_size=1, grad_accum=1, dp=world_size, grad_clip=0.0, bf16=False,
                         device=cpu, persistence_threshold=0)
    seen, whole = [], []
    gathered = deepspeed.zero.GatheredParameters

    def counting(params, *args, **kwargs):  # at every gather: how many elements are whole on this rank
        seen.extend(p for p in params if all(p is not q for q in seen))
        ctx = gathered(params, *args, **kwargs)

        class Counted:
            def __enter__(self):
                ctx.__enter__()
                whole.append(sum(p.numel() for p in seen))

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)

        return Counted()

    deepspeed.zero.GatheredParameters = counting
    try:
        model = build_pretrained(config_from_hf(src), zero_init=zero3_init(config, cpu))
    finally:
        deepspeed.zero.GatheredParameters = gathered
    shards = {n: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    with gathered(list(params.values()), modifier_rank=None):
        weights = {n: p.detach().clone() for n, p in params.items()}
    loss_module = LMLoss(model, CHUNK)
    engine, _ = init_zero_engine(loss_module, torch.optim.AdamW(loss_module.parameters(), lr=1e-3), None, config)
    tokens, labels = batch()
    loss = engine(tokens[rank:rank + 1], labels[rank:rank + 1]).detach()
    torch.save({"shards": shards, "whole": whole, "weights": weights, "loss": loss}, Path(out) / f"{rank}.pt")


def test_zero3_build_is_partitioned_and_loads_the_checkpoint(source, tmp_path, free_port):
    from safetensors.torch import load_file

    run_world(_worker, WORLD, free_port, str(source), str(tmp_path))
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]
    reference = build_pretrained(config_from_hf(source))  # one process, the whole model
    want = {n: p.detach() for n, p in reference.named_parameters()}
    total = sum(p.numel() for p in want.values())
    largest = max(p.numel() for p in want.values())
    for got in ranks:
        assert sorted(got["shards"]) == sorted(want)
        for name, (local, shard, numel) in got["shards"].items():
            assert local == 0 and numel == want[name].numel() and shard == -(-numel // WORLD), name
        # loading gathered one parameter at a time: never more whole than the largest, far below the model
        assert len(got["whole"]) == len(want) and max(got["whole"]) == largest < total / 2
        differ = [n for n in want if not torch.equal(got["weights"][n], want[n])]
        assert not differ, differ
    hf = load_file(str(source / "model.safetensors"))
    assert torch.equal(want["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    tokens, labels = batch()
    with torch.no_grad():
        single = LMLoss(reference, CHUNK)(tokens, labels)  # the loss sum over both ranks' sequences
    assert abs(sum(float(r["loss"]) for r in ranks) - float(single)) <= 1e-5 * abs(float(single))


def test_zero3_init_needs_a_stage_3_config():
    from parallel.data_parallel import zero3_init, zero_config

    config = zero_config(2, micro_batch_size=1, grad_accum=1, dp=2, grad_clip=0.0, bf16=False, device="cpu")
    with pytest.raises(ValueError, match=r"zero3_init: config must be a zero_config\(stage=3"):
        zero3_init(config, torch.device("cpu"))
