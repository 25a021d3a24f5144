"""The command line shared by the flows: `--config FILE` plus `key.sub=value` overrides."""
from __future__ import annotations

import argparse
import sys

from configs import ConfigError, PipelineConfig, load_config


def config_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.lr=1e-5")
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig | None:
    """The config the arguments name, or None after printing the one-line error (exit code 2)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars would bury the step log
    return cfg
