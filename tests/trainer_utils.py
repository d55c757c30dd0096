"""Shared by the trainer tests: compose the real Hydra config (typed, checked) and run one process."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import check_config, register_configs
from trainer.loop import Trainer
from trainer.parallelize import init_distributed

from helpers import ROOT
register_configs()


def compose_cfg(overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    check_config(cfg)
    return cfg


def train_one_process(base_overrides, out_dir, *overrides):
    cfg = compose_cfg([*base_overrides, f"train.out_dir={out_dir}", *overrides])
    return Trainer(cfg, init_distributed("cpu")).run()
