"""Hydra entry point.

    python -m trainer.train                                     # tiny model, CPU, embedded stdlib corpus
    python -m trainer.train model=llama_220m data.seq_len=65536 train.steps=1000
    torchrun --nproc_per_node=8 -m trainer.train parallel.dp=8 ...   # or scripts/launch.sh

The DictConfig is converted once to the typed Config (trainer/config.py); nothing below this file sees
Hydra. Under torchrun every rank uses the same run directory (train.out_dir) and only rank 0 lets Hydra
write into it.
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import Config, check_config, register_configs
from trainer.loop import Trainer
from trainer.parallelize import destroy_distributed, init_distributed

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    datasets.disable_progress_bars()  # tokenisation bars would bury the training progress bar
    cfg: Config = OmegaConf.to_object(dict_cfg)
    check_config(cfg)
    env = init_distributed(cfg.train.device, cfg.parallel)
    if env.rank > 0:
        logging.getLogger("trainer").setLevel(logging.WARNING)  # rank 0 reports for everyone
    try:
        Trainer(cfg, env).run()
    finally:
        destroy_distributed()


def _quiet_hydra_on_other_ranks() -> None:
    # Hydra writes .hydra/ and a log file into the run dir; ranks > 0 share that dir, so they write nothing.
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    _quiet_hydra_on_other_ranks()
    main()
