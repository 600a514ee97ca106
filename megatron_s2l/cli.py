"""`s2l` command line: train | pool | eval | study | convert. Parses, builds, runs, closes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from megatron_s2l.config import ConfigError, ModelConfig, ParallelConfig, load_config, to_yaml
from megatron_s2l.eval.runner import add_eval_arguments
from megatron_s2l.eval.study import add_study_arguments
from megatron_s2l.model.files import check_safetensors, require_model_dir
from megatron_s2l.pool_cli import add_pool_arguments
from megatron_s2l.preflight import preflight_train

logger = logging.getLogger("megatron_s2l")


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser. With `intermixed` set (`s2l train`), the positionals (key=value overrides) may
    come before, between and after the options, e.g. after `--resume PATH`."""

    intermixed = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed:
            return super().parse_known_args(args, namespace)
        self.intermixed = False  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self.intermixed = True


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this job (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this job (default 1)")


def _add_convert(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="convert weights: GGUF -> HF, HF <-> Megatron-Core",
        description="Convert between HF safetensors and Megatron dist checkpoints (torch_dist, "
                    "reshardable; one process, or under torchrun for TP x PP), or a GGUF file to HF.")
    sub = convert.add_subparsers(dest="direction", required=True)
    from_gguf = sub.add_parser(
        "gguf-to-hf", help="GGUF file (e.g. a quantised llama.cpp model) -> HF dir",
        description="Dequantise a GGUF file with transformers' GGUF loader and write a plain HF safetensors "
                    "folder with its tokenizer and chat template.")
    from_gguf.add_argument("--gguf", required=True, help="the .gguf file")
    from_gguf.add_argument("--out", required=True, help="output HF checkpoint directory")
    from_gguf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                           help="dtype of the dequantised weights (default float32)")
    to_mcore = sub.add_parser("hf-to-megatron", help="HF checkpoint dir -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="local HF checkpoint directory (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint directory")
    to_mcore.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                          help="parameter dtype in the checkpoint (auto: the HF config's)")
    _add_parallel_args(to_mcore)
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (converted or trained) -> HF dir")
    to_hf.add_argument("--ckpt", required=True, help="Megatron checkpoint directory (has s2l_model.json)")
    to_hf.add_argument("--out", required=True, help="output HF checkpoint directory")
    to_hf.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="dtype of the exported tensors (auto: the checkpoint's)")
    _add_parallel_args(to_hf)
    convert.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    if args.direction == "gguf-to-hf":
        from megatron_s2l.model.gguf import convert_gguf_to_hf  # lazy: torch, transformers (a fast --help)

        convert_gguf_to_hf(args.gguf, args.out, args.dtype)
        return 0
    import torch

    from megatron_s2l import platform  # lazy: torch (a fast --help)
    from megatron_s2l.model import checkpoint_io, specs  # lazy: torch (a fast --help)

    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    if args.direction == "hf-to-megatron":  # the input is checked before the process group starts
        check_safetensors(require_model_dir(args.hf, "--hf"))
        hf_config = specs.load_hf_config(args.hf)
        dtype = checkpoint_io.hf_dtype(hf_config) if args.dtype == "auto" else args.dtype
    else:
        model_dtype = checkpoint_io.read_checkpoint_meta(args.ckpt).get("dtype", "float32")
        out_dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)  # None: the checkpoint's
    platform.init_distributed(args.tp, args.pp)
    try:
        if args.direction == "hf-to-megatron":
            checkpoint_io.convert_hf_to_megatron(args.hf, args.out, ModelConfig(dtype=dtype), parallel)
        else:
            checkpoint_io.convert_megatron_to_hf(args.ckpt, args.out, ModelConfig(dtype=model_dtype),
                                                 parallel, dtype=out_dtype)
    finally:
        platform.destroy_distributed()
    return 0


def _add_train(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="run S2L-PO (or plain GRPO with explorer.mode=off)",
        description="Train with S2L-PO. Config from YAML plus key.sub=value overrides, e.g. "
                    "`s2l train --config examples/configs/tiny_cpu.yaml steps=4 rollout.group_size=8`. "
                    "Launch under torchrun for TP/PP/DP.")
    train.add_argument("--config", help="YAML run config (examples/configs/*.yaml)")
    train.add_argument("--resume", default=None,
                       help="`auto` (latest checkpoint in checkpoint.dir) or a checkpoint directory")
    train.add_argument("--print-config", action="store_true",
                       help="print the validated config with every default filled in (YAML) and exit")
    train.add_argument("overrides", nargs="*",
                       help="key.sub=value overrides of the YAML (anywhere in the line)")
    train.intermixed = True
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    preflight_train(cfg)  # data, pool, lengths, layout, run folder: before anything is built
    from megatron_s2l import platform  # lazy: torch and megatron-core (a fast --help)
    from megatron_s2l.train.build import build_trainer  # lazy: torch (a fast --help)

    with platform.distributed(cfg.parallel, seed=cfg.seed):
        if platform.is_rank0():  # the run's record, next to its metrics
            Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.logging.run_dir) / "config.yaml").write_text(to_yaml(cfg))
        trainer = build_trainer(cfg)
        try:
            trainer.run()
        finally:
            trainer.close()
    if trainer.control.stop_signal == "SIGINT":  # saved: now end as Ctrl-C ends a program
        platform.end_as_ctrl_c()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2l", description="megatron-s2l: S2L-PO on Megatron-Core")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(subparsers)
    add_pool_arguments(subparsers)
    add_eval_arguments(subparsers)
    add_study_arguments(subparsers)
    _add_convert(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the launchers start torchrun with SIGTERM ignored, so that only its workers act on one (examples/lib/
    # launch.sh); the workers inherit the ignore, and SIGTERM must still stop them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # megatron-core logs every parameter and its whole config at INFO
        logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # bad input: the message names the fix
        logger.error("%s", err)
        return 2
    except FloatingPointError as err:  # training diverged (optimizer.max_nonfinite_steps)
        logger.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
