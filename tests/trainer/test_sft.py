"""Supervised fine-tuning data (data=sft): loss masks, whole-document packing, and loss normalisation.

- a prompt/response row and a messages row give labels -100 exactly off the assistant tokens (against labels
  written out by hand from the tiny template), positions restart per document, cu_seqlens keeps documents
  apart (a model's hidden states of a packed document equal those of the document alone), num_valid counts
  the loss-carrying targets; the byte tokenizer takes prompt/response rows
- with ~90% of the labels masked, cp=2 (ring, 2 gloo ranks), dp=2 (DDP, 2 gloo ranks) and grad_accum=2 give the
  per-step losses of one process over the same global batch, and its step-1 gradients (read in an optimizer
  step pre-hook, unclipped), through the real Trainer.train_step
- bad rows (neither messages nor prompt/response, bad JSON, messages without a chat template) fail with the file
  and line; truncation is logged with its count; the loader resumes and splits rows over dp ranks
"""

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from dist_utils import run_world
from helpers import assert_close
from trainer.data import DataConfig, build_loader, build_tokenizer
from trainer.data.sft import sft_store
from trainer.loop import Trainer
from trainer.model import GPT, ModelConfig
from trainer.parallelize import init_distributed
from trainer_utils import compose_cfg

WORDS = "hello world how are you i am fine thanks what is two plus three five the answer a b c d e f g h".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# The tiny template: bos, then "<|role|> content <|end|> " per message; the generation prompt is "<|assistant|> ".
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
STEPS = 2  # step 2's loss already depends on step 1's gradients through the update
MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.vocab_size=0", "data=sft", "data.tokenizer=hf", "data.seq_len=64", "train.device=cpu",
         "train.eval_batches=0", "optim.grad_clip=0", "optim.warmup_steps=1", f"train.steps={STEPS}"]


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=SPECIALS[4:], chat_template=TEMPLATE)
    hf.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def expected_doc(row):
    """(ids, loss mask) written out from the template by hand: every assistant word and its <|end|> carry loss."""
    if "prompt" in row:
        head = ["<s>", *row["prompt"].split()]
        tail = [*row["response"].split(), "</s>"]
        return [VOCAB[t] for t in head + tail], [0] * len(head) + [1] * len(tail)
    ids, mask = [VOCAB["<s>"]], [0]
    for m in row["messages"]:
        words = m["content"].split() + ["<|end|>"]
        ids += [VOCAB[f"<|{m['role']}|>"]] + [VOCAB[w] for w in words]
        mask += [0] + [int(m["role"] == "assistant")] * len(words)
    return ids, mask


def expected_labels(ids, mask):
    """Next-token labels inside one document, -100 where the target carries no loss and after the last token."""
    return [ids[i + 1] if mask[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]


ROWS = [
    {"prompt": "what is two plus three", "response": "the answer is five"},
    {"messages": [{"role": "system", "content": "a b c"}, {"role": "user", "content": "hello how are you"},
                  {"role": "assistant", "content": "i am fine thanks"}, {"role": "user", "content": "two plus three"},
                  {"role": "assistant", "content": "five"}]},
    {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "d e f"},
                  {"role": "assistant", "content": "g h"}]},
    {"prompt": "a b c d e f g h", "response": ""},
]


def sft_cfg(path, tok_dir, **kw):
    return DataConfig(source="sft", path=path, tokenizer="hf" if tok_dir else "byte", tokenizer_path=tok_dir,
                      val_fraction=0.0, **{"seq_len": 64, "batch_size": 2, **kw})


def test_labels_positions_and_boundaries(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS * 3)
    cfg = sft_cfg(path, tok_dir, seq_len=40)
    tok = build_tokenizer(cfg)
    store = sft_store(cfg, tok, "train")
    for d, row in enumerate(ROWS * 3):
        ids, mask = expected_doc(row)
        a, b = store.doc_offsets[d], store.doc_offsets[d + 1]
        assert store.tokens[a:b].tolist() == ids and store.loss_mask[a:b].astype(int).tolist() == mask, row

    want = {tuple(expected_doc(r)[0]): expected_labels(*expected_doc(r)) for r in ROWS}
    model = GPT(ModelConfig(vocab_size=len(VOCAB), dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
                attn_backend="reference").double().requires_grad_(False)
    seen, alone, loader = [], {}, build_loader(cfg, tok, "train")
    for batch in loader.iter_epoch():
        packed = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"]).flatten(0, 1)
        tokens, labels = batch["tokens"].flatten().tolist(), batch["labels"].flatten().tolist()
        cu = batch["cu_seqlens"].tolist()
        assert set(range(0, len(tokens) + 1, cfg.seq_len)) <= set(cu)        # no segment crosses a row
        assert batch["num_valid"] == sum(x != -100 for x in labels)
        for a, b in zip(cu[:-1], cu[1:]):
            assert batch["position_ids"].flatten()[a:b].tolist() == list(range(b - a))
            if tuple(tokens[a:b]) in want:                                   # a document, not padding
                assert labels[a:b] == want[tuple(tokens[a:b])]
                if tuple(tokens[a:b]) not in alone:                          # no other document around it
                    alone[tuple(tokens[a:b])] = model(torch.tensor([tokens[a:b]]))[0]
                assert_close(packed[a:b], alone[tuple(tokens[a:b])], "packed vs alone", atol=1e-12, rtol=1e-12)
                seen.append(tuple(tokens[a:b]))
            else:
                assert set(labels[a:b]) == {-100} and set(tokens[a:b]) == {tok.pad_id}
    assert sorted(seen) == sorted(tuple(expected_doc(r)[0]) for r in ROWS * 3)  # each document once, whole


def test_byte_tokenizer_prompt_response_and_truncation(tmp_path, caplog):
    rows = [{"prompt": "ab", "response": "cd"}, {"prompt": "x" * 30, "response": "yz"}]
    cfg = sft_cfg(write_jsonl(tmp_path / "pairs.jsonl", rows * 2), None, seq_len=16, batch_size=4)
    tok = build_tokenizer(cfg)
    with caplog.at_level(logging.WARNING, logger="trainer.data.sft"):
        batch = next(iter(build_loader(cfg, tok, "train").iter_epoch()))
    assert "2 of 4 documents are longer than data.seq_len=16" in caplog.text
    assert "2 were left without a loss-carrying token and dropped" in caplog.text
    doc = [256, 97, 98, 99, 100, 257]
    got = batch["tokens"].flatten().tolist()
    assert got[:12] == doc * 2 and batch["num_valid"] == 6
    assert batch["labels"].flatten().tolist()[:6] == [-100, -100, 99, 100, 257, -100]


@pytest.mark.parametrize("line,match", [
    ({"text": "hello"}, "neither"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "b", "response": "c"}, "both"),
    ({"prompt": "a", "response": 3}, "'response' must be a string"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ("{not json", "not a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    cfg = sft_cfg(str(path), None)
    with pytest.raises(ValueError, match=rf"{path}, line 3: .*{match}"):
        build_loader(cfg, build_tokenizer(cfg), "train")


def test_messages_need_a_chat_template(tmp_path):
    cfg = sft_cfg(write_jsonl(tmp_path / "chat.jsonl", ROWS), None)
    with pytest.raises(ValueError, match=r"chat.jsonl, line 2: .*data.tokenizer=hf"):
        build_loader(cfg, build_tokenizer(cfg), "train")


def test_templates_that_rewrite_earlier_turns_are_refused(tmp_path, tok_dir):
    """A template whose render of a prefix is not a prefix of the whole (here: it starts with the turn count)."""
    from trainer.data.sft import encode_rows
    from trainer.data.tokenizer import HFTokenizer

    tok = HFTokenizer(tok_dir)
    tok._tok.chat_template = "{{ messages|length }} " + TEMPLATE
    with pytest.raises(ValueError, match=r"rows.jsonl, line 7: .*prefix by prefix \(messages\[2\]\)"):
        encode_rows(tok, [(7, ROWS[1])], "rows.jsonl")


def test_resume_and_dp_split(tmp_path, tok_dir):
    cfg = sft_cfg(write_jsonl(tmp_path / "rows.jsonl", ROWS * 8), tok_dir, batch_size=1)
    tok = build_tokenizer(cfg)
    single = build_loader(cfg, tok, "train", 0, 1, seed=3)
    ranks = [build_loader(cfg, tok, "train", r, 2, seed=3) for r in range(2)]
    for _ in range(3):
        want = next(single)["tokens"], next(single)["tokens"]
        assert all(torch.equal(next(r)["tokens"], w) for r, w in zip(ranks, want))  # slot k -> rank k % 2
    state = ranks[0].state_dict()
    resumed = build_loader(cfg, tok, "train", 0, 2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(5):  # crosses into the next epoch
        assert torch.equal(next(resumed)["tokens"], next(ranks[0])["tokens"])


# -- loss normalisation: cp=2, dp=2 and grad_accum=2 against one process ---------------------------------------

def training_rows(n=80, seed=0):
    """Long prompts, short replies: ~90% of the tokens carry no loss, unevenly over documents and shards."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": words(rng.randint(8, 40)), "response": words(rng.randint(0, 3))})
        else:
            rows.append({"messages": [{"role": "user", "content": words(rng.randint(5, 25))},
                                      {"role": "assistant", "content": words(rng.randint(1, 3))}]})
    return rows


def run_steps(overrides):
    """Per-step global losses of Trainer.train_step, the step-1 gradients (as the optimizer sees them) and
    the valid-target counts of step 1's micro-batches on this rank."""
    cfg = compose_cfg([*MODEL, *overrides])
    trainer = Trainer(cfg, init_distributed("cpu", cfg.parallel))
    grads = []

    def keep_first(optimizer, args, kwargs):
        if not grads:
            grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(keep_first)
    losses, counts = [], []
    for _ in range(STEPS):
        micro_batches = trainer._next_micro_batches()
        counts = counts or [trainer._prepare_batch(b)["num_valid"] for b in micro_batches]
        loss, _ = trainer.train_step(micro_batches)
        losses.append(loss.item())
    return losses, grads[0], counts


def assert_matches(losses, grads, want, label):
    want_losses, want_grads = want
    worst = max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in want_grads.items())
    print(f"{label}: losses {losses} vs {want_losses}; max |grad diff| / max |grad| {worst:.1e}")
    assert np.allclose(losses, want_losses, rtol=1e-5, atol=0), (label, losses, want_losses)
    for name, g in want_grads.items():
        assert_close(grads[name], g, f"{label} d{name}", atol=1e-5 * float(g.abs().max()), rtol=1e-5)


def _world_worker(rank, world_size, cases, want):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    for label, overrides in cases:   # one world for both cases: starting ranks is the slow part
        losses, grads, counts = run_steps(overrides)
        assert_matches(losses, grads, want, label)
        mine = torch.tensor(counts)
        torch.distributed.all_reduce(mine)
        assert counts[0] != mine[0] - counts[0], (label, counts)  # the ranks' shares of targets differ


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, tok_dir):
    """One process, the whole global batch of 4 rows per step."""
    root = tmp_path_factory.mktemp("sft_train")
    rows = training_rows()
    data = [f"data.path={write_jsonl(root / 'train.jsonl', rows)}", f"data.tokenizer_path={tok_dir}"]
    masks = [expected_doc(r)[1] for r in rows]
    carry_loss = sum(map(sum, masks)) / sum(map(len, masks))
    assert 0.05 < carry_loss < 0.15, carry_loss             # ~90% of the tokens carry no loss
    losses, grads, _ = run_steps([*data, "data.batch_size=4", f"train.out_dir={root / 'one'}"])
    return root, data, (losses, grads)


def test_grad_accum_matches_one_process(oracle):
    root, data, want = oracle
    losses, grads, counts = run_steps([*data, "data.batch_size=2", "train.grad_accum=2",
                                       f"train.out_dir={root / 'ga'}"])
    assert_matches(losses, grads, want, "grad_accum=2")
    # Unequal micro-batch counts: a mean of per-micro-batch means would weight their tokens differently
    # (and change the gradients well beyond the tolerance); the sum over the global count does not.
    assert counts[0] != counts[1], counts


def test_cp2_and_dp2_match_one_process(oracle, free_port):
    root, data, want = oracle
    cases = [("cp=2", [*data, "parallel.cp=2", "parallel.cp_impl=ring", "data.batch_size=4",
                       f"train.out_dir={root / 'cp2'}"]),
             ("dp=2", [*data, "data.batch_size=2", f"train.out_dir={root / 'dp2'}"])]
    run_world(_world_worker, 2, free_port, cases, want)
