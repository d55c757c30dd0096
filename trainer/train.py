"""Hydra entry point.

    python -m trainer.train                                     # tiny model, CPU, embedded stdlib corpus
    python -m trainer.train model=llama_220m data.seq_len=65536 train.steps=1000
    torchrun --nproc_per_node=8 -m trainer.train parallel.dp=8 ...   # or scripts/launch.sh
    python -m trainer.train --help                              # config groups, every key and its meaning

The DictConfig is converted once to the typed Config (trainer/config.py); nothing below this file sees
Hydra. The run directory is outputs/<run_name>: the preset's name plus a hash of the run-defining overrides
(trainer/config.py, RUN_NAME_IGNORED), so the same command resumes its run. Under torchrun every rank uses the
same run directory (train.out_dir) and only rank 0 lets Hydra write into it.

Exit codes: 0 done; 1 a config / data / checkpoint problem (one line on stderr; HYDRA_FULL_ERROR=1 shows the
trace) or a stop on non-finite losses; 130 (SIGINT, Ctrl-C) / 143 (SIGTERM) after the checkpoint of the step
in progress was saved (trainer/stop.py), or, before training started or on a second Ctrl-C, without one.
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import Config, check_config, register_configs
from trainer.loop import Trainer, TrainingStopped
from trainer.parallelize import destroy_distributed, init_distributed

register_configs()

@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0 or not sys.stderr.isatty():
        datasets.disable_progress_bars()  # tokenisation bars: rank 0 and a terminal only, no \r spam in logs
    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
        check_config(cfg)
        env = init_distributed(cfg.train.device, cfg.parallel)  # checks parallel.* before any process group
        if env.rank > 0:
            logging.getLogger("trainer").setLevel(logging.WARNING)  # rank 0 reports for everyone
        try:
            trainer = Trainer(cfg, env)
            trainer.run()
        finally:
            destroy_distributed()
    except (ValueError, TrainingStopped) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)  # one line the user can act on, not a trace
        sys.exit(1)
    except KeyboardInterrupt:  # before the training loop (no step to save) or a second Ctrl-C
        out = OmegaConf.select(dict_cfg, "train.out_dir", throw_on_resolution_failure=False)
        print(f"interrupted: no checkpoint saved for the step in progress; the newest one in {out}/checkpoints "
              f"(if any) resumes the run", file=sys.stderr)
        sys.exit(130)
    if trainer.stopped_by:
        sys.exit(128 + trainer.stopped_by)


def _quiet_hydra_on_other_ranks() -> None:
    # Hydra writes .hydra/ and a log file into the run dir; ranks > 0 share that dir, so they write nothing.
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    _quiet_hydra_on_other_ranks()
    main()
