"""The `xlstm-export` command line.

Every subcommand is a thin layer over a library function. Errors a user can cause (a bad path, a
bad checkpoint, a shape mismatch) end in one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


def _load_model(source: str, **overrides):
    from .models import load

    return load(source, **overrides)


# --- convert / info ------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    model = _load_model(args.source)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    model.save_pretrained(out)
    print(f"wrote {out}/config.json and {out}/model.safetensors ({model.num_params():,} parameters)")
    return 0


def model_info(model) -> dict:
    cfg = model.config
    return {
        "architecture": cfg.architecture,
        "config": cfg.to_dict(),
        "block_types": cfg.block_types(),
        "parameters": model.num_params(),
        "state_bytes_per_sequence": model.state_bytes(1),
        "state_tensors": {k: list(s) for k, s in model.state_spec(1).items()},
    }


def cmd_info(args) -> int:
    info = model_info(_load_model(args.source))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"architecture      {info['architecture']}")
    print(f"blocks            {cfg['num_blocks']}  ({''.join(t[0] for t in info['block_types'])}: m = mLSTM, s = sLSTM)")
    print(f"embedding_dim     {cfg['embedding_dim']}")
    print(f"vocab_size        {cfg['vocab_size']}")
    print(f"mLSTM heads       {cfg['num_heads']}")
    if cfg["slstm_at"]:
        print(f"sLSTM heads       {cfg['slstm_num_heads']}  at blocks {cfg['slstm_at']}")
    print(f"parameters        {info['parameters']:,}")
    print(f"state per seq     {info['state_bytes_per_sequence']:,} bytes (float32, {len(info['state_tensors'])} tensors)")
    return 0


# --- run: the main job ----------------------------------------------------------------------------
def cmd_run(args) -> int:
    """The whole pipeline on one model, with one summary at the end."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str]] = []

    model = _load_model(args.source)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    info = model_info(model)
    summary.append(("convert", f"{model_dir} ({info['parameters']:,} parameters)"))
    summary.append(("info", f"{info['architecture']} {''.join(t[0] for t in info['block_types'])}, "
                            f"state {info['state_bytes_per_sequence']:,} bytes/sequence"))

    width = max(len(k) for k, _ in summary)
    print("\nsummary")
    for k, v in summary:
        print(f"  {k:<{width}}  {v}")
    return 0


# --- parser --------------------------------------------------------------------------------------
SOURCE_HELP = "a preset name (e.g. tiny), a directory written by convert/train, or a transformers xLSTM directory"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlstm-export",
        description="Deploy xLSTM models: convert, export to ONNX with xlstm:: custom ops, validate, "
        "build TensorRT engines, generate, train.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="write a model in this project's format (config.json + safetensors)")
    c.add_argument("source", help=SOURCE_HELP)
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="config, parameter count and state bytes per sequence")
    i.add_argument("source", help=SOURCE_HELP)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("run", help="the main job: convert, export, validate, generate (and TensorRT when present)")
    r.add_argument("source", nargs="?", default="tiny", help=SOURCE_HELP + " (default: tiny)")
    r.add_argument("-o", "--output", default="xlstm-export-run", help="output folder (default: ./xlstm-export-run)")
    r.set_defaults(func=cmd_run)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("xlstm-export: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user; --debug for the traceback
        if args.debug or not _is_user_error(e):
            raise
        print(f"xlstm-export {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: Exception) -> bool:
    from .models import CheckpointError

    return isinstance(e, (UserError, CheckpointError, ValueError, TypeError, FileNotFoundError,
                          PermissionError, IsADirectoryError, NotADirectoryError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
