"""The command line shared by the flows: `--config FILE` plus `key.sub=value` overrides.

A mistake the user can fix (`configs.UserError`: a bad field, an unreadable file, a missing model
folder) is printed as one line, `error: ...`, and the command exits with code 2 before any flow
starts: `config_from_args` loads the config and runs `preflight`, the checks that are cheap enough
to do up front.
"""
from __future__ import annotations

import argparse
import sys

from configs import PipelineConfig, UserError, load_config


def config_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.lr=1e-5")
    return parser


def preflight(cfg: PipelineConfig) -> None:
    """What can be checked before a flow starts, in well under a second: the policy's local folder
    (`model.policy`) has a config, a tokenizer and weights, and the GSM8K-format data files decode and
    hold enough well-formed problems for both splits. Raises a `UserError` naming the field and file."""
    from models.loading import check_model_source
    from problems.datasets import BUILT_IN, load_splits

    if cfg.model.policy.startswith("models:/"):  # a registry reference: check the folder of its version
        from tasks.registry import resolve_policy

        cfg = resolve_policy(cfg)[0]
    check_model_source(cfg.model.policy)
    if cfg.data.prompt_set == "gsm_symbolic":  # generated, so it cannot be malformed; needs its extra
        import importlib.util

        from problems.gsm_symbolic import MISSING
        from problems.gsm8k import DatasetError

        if importlib.util.find_spec("reasoning_gym") is None:
            raise DatasetError(MISSING)
    elif cfg.data.prompt_set not in BUILT_IN:
        load_splits(cfg.data)


def one_line(err: BaseException) -> str:
    """The error's message with every non-printable character escaped: a newline, a terminal control
    code or an undecodable byte (a surrogate escape of a command-line argument) in a file name or key
    cannot break the single line or reach the terminal raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(err))


def config_from_args(args: argparse.Namespace) -> PipelineConfig | None:
    """The config the arguments name, preflight-checked, or None after printing the one-line error
    (the caller exits with code 2)."""
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars would bury the step log
    return cfg
