"""Runs a user can reason about: default run names, resume rules (shape, train.steps), an unreadable newest
checkpoint, SIGINT / SIGTERM saving at the step boundary (all ranks agreeing), and one-line errors."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from dist_utils import run_world
from helpers import ROOT
from test_trainer import FAST, metrics, poison_losses
from trainer.checkpoint import list_checkpoints
from trainer.config import run_name_for
from trainer.data import DataConfig, build_loader, build_tokenizer
from trainer.loop import Trainer, TrainingStopped
from trainer.parallelize import init_distributed, resolve_parallel, validate_parallel
from trainer.stop import GracefulStop
from trainer_utils import compose_cfg, train_one_process

# The schedule follows train.steps here (FAST fixes optim.decay_steps=36), so a changed train.steps matters.
RUN = [*FAST, "optim.decay_steps=null", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6; its cosine ends at step 6."""
    out = tmp_path_factory.mktemp("run6")
    train_one_process(RUN, out, "train.steps=6")
    return out


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# -- run names ------------------------------------------------------------------------------------------------

def hydra_run_name(overrides) -> tuple[str, str]:
    """run_name and train.out_dir as Hydra resolves them for a command line (its job config set, as in a run)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return cfg.run_name, cfg.train.out_dir
    finally:
        HydraConfig.instance().cfg = None


SHAPES = [[], ["data.seq_len=512"], ["data.seq_len=1024"], ["data.batch_size=4"], ["model=llama_220m"],
          ["model.dim=128"], ["model.dim=128", "data.seq_len=512"], ["optim.lr=1e-3"], ["parallel.cp=2"],
          ["data=hf", "data.path=a.jsonl"], ["data=hf", "data.path=b.jsonl"], ["train.seed=1"],
          ["train.init_from=outputs/x"], ["attention.backend=sdpa"]]


def test_default_run_names_differ_by_shape_and_repeat_for_the_same_command():
    names = [run_name_for("cpu_default", s) for s in SHAPES]
    assert len(set(names)) == len(SHAPES), names
    assert names[0] == "cpu_default"
    same = ["data.seq_len=512", "optim.lr=1e-3"]
    assert run_name_for("cpu_default", same) == run_name_for("cpu_default", same[::-1])
    # keys that do not change the trained run keep its name, so the command resumes it
    quiet = ["train.steps=1000", "train.log_every=5", "logger=wandb", "eval.passkey_every=100", "train.resume=auto"]
    assert run_name_for("cpu_default", same + quiet) == run_name_for("cpu_default", same)
    # through Hydra, as a command line resolves it: the preset's name, the hash, and the run dir built from them
    name, out_dir = hydra_run_name(["experiment=cpu_passkey", "data.seq_len=128", "train.steps=5"])
    assert name == run_name_for("cpu_passkey", ["data.seq_len=128"]) and out_dir == f"outputs/{name}"
    assert hydra_run_name(["train.steps=5"])[0] == "cpu_default"
    assert hydra_run_name(["run_name=mine", "data.seq_len=128"]) == ("mine", "outputs/mine")


def test_every_preset_names_its_run_through_the_resolver():
    for preset in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        assert f"run_name: ${{auto_run_name:{preset.stem}}}" in preset.read_text(), preset.name


# -- resume rules -----------------------------------------------------------------------------------------------

def test_unreadable_newest_checkpoint_falls_back_with_a_warning(run6, tmp_path, caplog):
    out = copy_run(run6, tmp_path / "run")
    state = out / "checkpoints" / "step_6" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy cut short
    trainer = Trainer(compose_cfg([*RUN, f"train.out_dir={out}", "train.steps=6"]), init_distributed("cpu"))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        trainer.maybe_resume()
    assert trainer.step == 3
    assert "step_6" in caplog.text and "unreadable" in caplog.text and "step_3" in caplog.text
    trainer.run()  # steps 4..6 again, the same as the first time
    again, reference = metrics(out), metrics(run6)
    assert [again[s]["loss"] for s in range(1, 7)] == [reference[s]["loss"] for s in range(1, 7)]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]


@pytest.mark.parametrize("overrides,keys", [
    (["data.seq_len=128"], [r"data\.seq_len 64 -> 128"]),
    (["model.dim=32", "data.batch_size=2"], [r"model\.dim 64 -> 32", r"data\.batch_size 4 -> 2"]),
    (["optim.decay_steps=20"], [r"optim\.decay_steps 6 -> 20"]),
])
def test_resume_with_another_shape_names_the_keys(run6, overrides, keys):
    with pytest.raises(ValueError) as err:
        train_one_process(RUN, run6, "train.steps=6", *overrides)
    message = str(err.value)
    assert "\n" not in message and "Error(s) in loading" not in message
    for key in keys:
        assert re.search(key, message), (key, message)
    assert "run_name=NEW" in message and f"train.init_from={run6}" in message


def test_more_steps_continue_the_schedule_at_min_lr(run6, tmp_path, caplog):
    """train.steps 6 -> 9 on resume: the cosine still ends at step 6 (the checkpoint's), then min_lr; a schedule
    rebuilt for 9 steps would jump back up to about 1.4e-3 at step 7."""
    out = copy_run(run6, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint"):
        train_one_process(RUN, out, "train.steps=9")
    m, ref = metrics(out), metrics(run6)
    assert [m[s]["lr"] for s in range(1, 7)] == [ref[s]["lr"] for s in range(1, 7)]
    assert [m[s]["lr"] for s in (7, 8, 9)] == pytest.approx([3e-4] * 3)  # optim.min_lr, as the schedule ends
    assert "train.steps 6 -> 9" in caplog.text and "continues unchanged" in caplog.text


# -- stopping ---------------------------------------------------------------------------------------------------

def test_sigint_saves_a_checkpoint_and_the_resumed_run_is_bit_exact(tmp_path):
    out, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [sys.executable, "-m", "trainer.train", *FAST, "train.steps=1000", f"train.out_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    step = max(s for s, _ in list_checkpoints(out / "checkpoints"))
    assert f"SIGINT: stopped at step {step} of 1000, checkpoint saved in {out}/checkpoints/step_{step}" in stdout
    assert max(metrics(out)) == step
    end = step + 3
    train_one_process(FAST, out, f"train.steps={end}")  # resumes (train.steps may change; the schedule is fixed)
    train_one_process(FAST, tmp_path / "reference", f"train.steps={end}")
    resumed, reference = metrics(out), metrics(tmp_path / "reference")
    assert sorted(resumed) == list(range(1, end + 1))
    assert [resumed[s]["loss"] for s in resumed] == [reference[s]["loss"] for s in resumed]  # bit for bit


def _stop_worker(rank, world_size):
    with GracefulStop(rank, world_size) as stop:
        for step in range(1, 20):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
                time.sleep(0.1)  # let the handler run
            if stop.requested():
                break
    assert (step, stop.signum) == (3, signal.SIGTERM), (rank, step, stop.signum)


def test_ranks_agree_on_the_step_to_stop_at(free_port):
    run_world(_stop_worker, 2, free_port)


def test_non_finite_stop_mentions_only_an_existing_checkpoint(tmp_path, monkeypatch):
    poison_losses(monkeypatch, set(range(2, 100)))
    with pytest.raises(TrainingStopped) as err:
        train_one_process(FAST, tmp_path, "train.steps=10", "train.max_bad_steps=2", "train.eval_batches=0")
    assert "no checkpoint was written yet" in str(err.value) and "checkpoints" not in str(err.value)


# -- one-line errors --------------------------------------------------------------------------------------------

def test_context_parallel_without_torchrun_says_how_to_launch():
    cfg = compose_cfg(["parallel.cp=2"])
    with pytest.raises(ValueError, match=r"parallel.cp=2 needs 2 ranks.*torchrun --nproc_per_node=2 -m "
                                         r"trainer.train"):
        resolve_parallel(cfg.parallel, 1)
    assert cfg.parallel.cp == 2  # nothing is reset
    with pytest.raises(ValueError, match=r"parallel.dp=3 x parallel.cp=2 needs 6 ranks, but the world size "
                                         r"is 4: launch with torchrun --nproc_per_node=6"):
        resolve_parallel(compose_cfg(["parallel.cp=2", "parallel.dp=3"]).parallel, 4)


@pytest.mark.parametrize("content,match", [("", r"is empty"),
                                           ('{"content": "no text here"}\n', r"text_column='text' is not a column")])
def test_hf_file_problems_are_named(tmp_path, content, match):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content)
    cfg = DataConfig(source="hf", path=str(path), streaming=False, seq_len=64, batch_size=2)
    with pytest.raises(ValueError, match=match) as err:
        build_loader(cfg, build_tokenizer(cfg), "train")
    assert str(path) in str(err.value)
