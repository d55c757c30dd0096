"""Passkey retrieval (needle in a haystack) over context lengths x needle depths -> JSON + heatmap PNG.

    python -m trainer.eval_passkey checkpoint=outputs/cpu_passkey lengths=[256,512,1024] depths=[0,0.5,1]
    python -m trainer.eval_passkey checkpoint=outputs/run/checkpoints/step_300 samples=20 \
        model.rope_scaling.type=linear model.rope_scaling.factor=4
    result = evaluate_passkey(model_predictor(model, device), tok, lengths, depths, samples=10, seed=0)

Score: the model reads the prompt (trainer/passkey.py) and must produce the key's digits. `exact` is the
fraction of samples whose digits are all right under teacher forcing, which is exactly greedy decoding (the
greedy continuation is the key iff every digit is the argmax given the right digits before it); `digit` is
the teacher-forced per-digit accuracy. Chance for uniformly random keys: exact 1e-5, digit 0.1. Arguments
are Hydra-style key=value overrides of PasskeyConfig (parsed by OmegaConf, as in trainer.train); the
trainer runs the same evaluation every eval.passkey_every steps (trainer/loop.py).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .data.passkey import KEY_DIGITS, make_sample
from .eval import load_checkpoint_model, write_json_and_plot

CHANCE = {"exact": 10.0 ** -KEY_DIGITS, "digit": 0.1}

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(prompts (B, L), answers (B, a)) -> predicted answer ids (B, a), teacher-forced on the answers."""


@dataclass
class PasskeyConfig:
    checkpoint: str = "???"  # a run dir (newest checkpoint) or a checkpoints/step_<N> dir
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])  # context lengths (tokens)
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depths (0: start)
    samples: int = 10  # prompts per (length, depth), each with its own key
    seed: int = 1234  # the keys and haystacks drawn
    out: Optional[str] = None  # output stem; default <run dir>/passkey/step_<N>
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    batch_size: int = 8  # prompts per forward (lower it at long lengths)
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. rope_scaling / rope_theta
    attention_backend: str = "auto"  # auto | gluon | triton | sdpa | reference


def model_predictor(model, device, autocast_dtype: Optional[torch.dtype] = None) -> Predictor:
    """Teacher-forced argmax of `model` (a trainer GPT) at the answer positions; logits only there."""

    @torch.no_grad()
    def predict(prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([prompts, answers[:, :-1]], dim=1).to(device)  # (B, L + a - 1)
        L = prompts.shape[1]
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            hidden = model(tokens)[:, L - 1:]  # (B, a, dim): the positions that predict the digits
            logits = hidden.float() @ model.output_weight.float().T
        return logits.argmax(-1).cpu()

    return predict


def evaluate_passkey(predict: Predictor, tokenizer, lengths, depths, samples: int = 10, seed: int = 0,
                     batch_size: int = 8) -> dict:
    """Accuracy grids (depth x length) of `predict` on fresh passkey prompts (deterministic in seed)."""
    from tqdm import tqdm

    exact = np.zeros((len(depths), len(lengths)))
    digit = np.zeros_like(exact)
    # a bar on a terminal only (disable=None), shown once the evaluation takes more than a second
    bar = tqdm(total=len(lengths) * len(depths), desc="passkey eval", unit="cell", delay=1, disable=None,
               leave=False)
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            rng = np.random.default_rng([seed, j, i])
            cases = [make_sample(tokenizer, int(length), float(depth), rng) for _ in range(samples)]
            hits, right = 0, 0.0
            for s in range(0, samples, batch_size):
                part = cases[s:s + batch_size]
                prompts = torch.from_numpy(np.stack([c.prompt for c in part]))
                answers = torch.from_numpy(np.stack([c.answer for c in part]))
                pred = predict(prompts, answers)
                ok = pred == answers
                hits += int(ok.all(dim=1).sum())
                right += float(ok.float().mean(dim=1).sum())
            exact[i, j], digit[i, j] = hits / samples, right / samples
            bar.update(1)
    bar.close()
    return {"lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths], "samples": samples,
            "seed": seed, "exact": exact.tolist(), "digit": digit.tolist(), "mean_exact": float(exact.mean()),
            "mean_digit": float(digit.mean()), "chance": CHANCE}


def save_heatmap(result: dict, path, title: str = "") -> None:
    """Exact-match accuracy per (depth, length) as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(result["exact"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.55 * grid.shape[0]))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(grid.shape[0]), [f"{d:.2f}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact match")
    ax.set_title(title or f"passkey retrieval: {100 * result['mean_exact']:.0f}% exact "
                          f"(chance {CHANCE['exact']:.0e}), n={result['samples']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_result(result: dict, stem, title: str = "") -> tuple[Path, Path]:
    """<stem>.json and <stem>.png."""
    return write_json_and_plot(result, stem, save_heatmap, title)


def evaluate_during_training(model, tokenizer, eval_cfg, device, autocast_dtype, out_dir, step: int) -> dict:
    """The trainer's periodic eval (eval.passkey_*): writes <out_dir>/passkey/step_<N>.{json,png} and
    returns the metrics to log."""
    was_training = model.training
    model.eval()
    try:
        # Eager: compiling the eval's prompt lengths would add a dynamic-shape graph that dynamo then also picks
        # for the training shape (newest cache entry first), in place of the static one training compiled.
        with torch.compiler.set_stance("force_eager"):
            result = evaluate_passkey(model_predictor(model, device, autocast_dtype), tokenizer,
                                      eval_cfg.passkey_lengths, eval_cfg.passkey_depths, eval_cfg.passkey_samples,
                                      seed=1234, batch_size=eval_cfg.passkey_batch_size)
    finally:
        model.train(was_training)
    result["step"] = step
    write_result(result, Path(out_dir) / "passkey" / f"step_{step}",
                 f"passkey, step {step}: {100 * result['mean_exact']:.0f}% exact (chance 1e-5)")
    return {"passkey_exact": result["mean_exact"], "passkey_digit": result["mean_digit"]}


# -- the command line: load a checkpoint, evaluate, write ----------------------------------------------------

def load_for_eval(cfg: PasskeyConfig):
    """(model, tokenizer, step, ckpt_dir) from a trainer checkpoint, with cfg.model overrides applied."""
    from .parallelize import resolve_device

    model, tok, _, info = load_checkpoint_model(cfg.checkpoint, cfg.model, cfg.attention_backend,
                                                resolve_device(cfg.device, 0))
    return model, tok, info["step"], Path(info["checkpoint"])


def run(cfg: PasskeyConfig) -> dict:
    model, tok, step, ckpt = load_for_eval(cfg)
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else None
    result = evaluate_passkey(model_predictor(model, device, autocast), tok, cfg.lengths, cfg.depths, cfg.samples,
                              cfg.seed, cfg.batch_size)
    result.update(checkpoint=str(ckpt), step=step, model_overrides=dict(cfg.model))
    stem = cfg.out or ckpt.parent.parent / "passkey" / f"step_{step}"
    paths = write_result(result, stem, f"passkey, step {step}: {100 * result['mean_exact']:.0f}% exact, "
                                       f"{100 * result['mean_digit']:.0f}% digits (chance 1e-5 / 10%)")
    print(f"passkey step {step}: exact {result['mean_exact']:.3f}, digit {result['mean_digit']:.3f} "
          f"(chance {CHANCE['exact']:.0e} / {CHANCE['digit']}) -> {paths[0]}, {paths[1]}")
    return result


USAGE = """python -m trainer.eval_passkey checkpoint=DIR [KEY=VALUE ...]: passkey retrieval of a trainer checkpoint
over context lengths x needle depths; writes <run dir>/passkey/step_<N>.json and .png (or out=STEM).

  python -m trainer.eval_passkey checkpoint=outputs/cpu_passkey lengths=[256,512,1024] depths=[0,0.5,1]

Keys (key: default  # meaning):
"""


def parse_args(argv) -> PasskeyConfig:
    """key=value overrides of PasskeyConfig; ValueError naming a key that is unknown or a value that does not fit."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        cli = OmegaConf.from_dotlist(list(argv))
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PasskeyConfig), cli))
    except MissingMandatoryValue:
        raise ValueError("checkpoint=<run dir or checkpoints/step_N dir> is required (see --help)") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        what = f"{key}: " if key else ""
        raise ValueError(f"{what}{str(exc).splitlines()[0]} (python -m trainer.eval_passkey --help lists the "
                         f"keys)") from None


def main(argv=None) -> None:
    from .cli_help import describe_keys

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE + "\n".join("  " + line for line in describe_keys(PasskeyConfig)))
        return
    run(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # a bad key, value or checkpoint: one line, not a trace
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
