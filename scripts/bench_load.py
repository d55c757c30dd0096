"""Memory of loading a Hugging Face checkpoint: ringflash's build_pretrained vs transformers' from_pretrained.

    python scripts/bench_load.py --shape 8b --out docs/bench/load_h200          # GPU: bf16 onto cuda
    python scripts/bench_load.py --shape tiny --device cpu --out /tmp/load      # CPU smoke run

Writes a random-weight checkpoint of the shape (bf16, sharded safetensors + index, as transformers saves it) to
--dir (kept and reused when its config matches), then loads it in bf16 onto --device twice, each in a fresh
subprocess so the peaks are separate: `ringflash` = trainer.model.hf.build_pretrained (meta-device build, each
tensor read once from the memory-mapped files into its final dtype and device) and `transformers` =
AutoModelForCausalLM.from_pretrained(dtype=bfloat16), with device_map=--device when accelerate is installed
(else loaded on the CPU and moved). Columns: load seconds; peak host RSS during the load (VmHWM, restarted
after the imports) and its rise over the RSS before; the RSS once every weight has been read (the checksum):
transformers keeps CPU weights whose dtype matches the file as views of the memory-mapped file, which count
only when read; peak GPU memory (torch.cuda.max_memory_allocated); parameters. A checksum of the loaded weights
must agree between the two. Table on stdout, JSON in --out/load.json.

Shapes: tiny (CPU), 1b = Llama-3.2-1B (tied embeddings, llama3 RoPE scaling), 8b = Llama-3-8B (16 GB in bf16).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
               bos_token_id=128000, eos_token_id=128001)
SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
    "1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
    "8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False),
}
LOADERS = ("ringflash", "transformers")


def write_checkpoint(shape: str, directory: Path, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `shape` in `directory` (reused if config.json already matches)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "bench_shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == SHAPES[shape]:
        return directory
    with torch.device("meta"):  # names and shapes only
        skeleton = AutoModelForCausalLM.from_config(config)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(gen_device).manual_seed(seed)
    state = {}
    for name, p in skeleton.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: the checkpoint holds the embedding once, as Llama-3.2-1B's does
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=gen_device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[name] = t.cpu()
    save_torch_state_dict(state, str(directory), max_shard_size="5GB")
    config.save_pretrained(directory)
    marker.write_text(json.dumps(SHAPES[shape]))
    return directory


def _status_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc; elsewhere getrusage's peak for both."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux units (KiB); macOS gives bytes


def _reset_peak_rss() -> None:
    # ru_maxrss would carry the parent's RSS at fork into this process (Linux keeps the larger of the two across
    # exec); VmHWM belongs to this process's own address space, and writing 5 to clear_refs restarts it here.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def load_once(loader: str, directory: Path, device: str) -> dict:
    """Load in this process and measure; run by the child subprocess."""
    dev = torch.device(device)
    # Imports before the clock and the RSS baseline: the load is measured, not the import of its modules.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    from trainer.model.hf import build_pretrained, config_from_hf

    AutoConfig.from_pretrained(str(directory))
    _reset_peak_rss()
    rss_before = _status_gib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    if loader == "ringflash":
        model = build_pretrained(config_from_hf(str(directory)), device=dev, dtype=torch.bfloat16)
    elif importlib.util.find_spec("accelerate") is not None:  # transformers places weights itself only with it
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16, device_map=str(dev))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    rss_peak = _status_gib("VmHWM")
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())  # order-free, ties once
    return {"loader": loader, "load_s": seconds, "peak_rss_gib": rss_peak, "rss_before_gib": rss_before,
            "rss_rise_gib": rss_peak - rss_before, "rss_after_use_gib": _status_gib("VmRSS"),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
            "params": sum(p.numel() for p in model.parameters()), "checksum": checksum}


def measure(loader: str, directory: Path, device: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", loader, "--dir", str(directory),
           "--device", device]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} load failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_weights(a: dict, b: dict) -> bool:
    """Same parameter count and checksum (a float64 sum, so only the summation order may differ)."""
    return a["params"] == b["params"] and abs(a["checksum"] - b["checksum"]) <= 1e-6 * max(1.0, abs(b["checksum"]))


def table(rows: list[dict]) -> str:
    head = (f"{'loader':<13}{'load s':>8}{'peak RSS GiB':>14}{'RSS rise GiB':>14}{'RSS in use GiB':>16}"
            f"{'peak GPU GiB':>14}{'params':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['loader']:<13}{r['load_s']:>8.2f}{r['peak_rss_gib']:>14.2f}{r['rss_rise_gib']:>14.2f}"
                     f"{r['rss_after_use_gib']:>16.2f}{r['peak_gpu_gib']:>14.2f}{r['params']:>15,}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default=None, help="checkpoint dir (default /tmp/ringflash_bench_load/<shape>)")
    p.add_argument("--out", default=None, help="directory for load.json")
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    directory = Path(args.dir or f"/tmp/ringflash_bench_load/{args.shape}")
    if args.child:
        print(json.dumps(load_once(args.child, directory, args.device)))
        return {}
    t0 = time.perf_counter()
    write_checkpoint(args.shape, directory)
    written = time.perf_counter() - t0
    rows = [measure(loader, directory, args.device) for loader in LOADERS]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"shape": args.shape, "device": device_name, "dtype": "bf16", "checkpoint": str(directory),
              "checkpoint_gib": sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**30,
              "write_s": written, "rows": rows,
              "weights_match": _same_weights(*rows)}
    print(f"{args.shape} checkpoint ({result['checkpoint_gib']:.2f} GiB bf16) loaded onto {device_name}:")
    print(table(rows))
    print(f"weights match: {result['weights_match']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "load.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
