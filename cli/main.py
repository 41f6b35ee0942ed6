"""`hat`: one command, with subcommands for every role."""
from __future__ import annotations

import argparse
import sys

from . import (cloud_cmd, convert_gguf_cmd, demo_cmd, device_cmd, export_onnx_cmd, generate_cmd, keys_cmd, log_format,
               pull_cmd, split_cmd, testbed_cmd, train_adapter_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hat", description="Device-cloud split LLM inference (HAT design).")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="json: one JSON object per line, with fields such as session, device and code")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pull_cmd.add_parser(commands)
    convert_gguf_cmd.add_parser(commands)
    split_cmd.add_parser(commands)
    cloud_cmd.add_parser(commands)
    generate_cmd.add_parser(commands)
    demo_cmd.add_parser(commands)
    train_adapter_cmd.add_parser(commands)
    testbed_cmd.add_parser(commands)
    device_cmd.add_parser(commands)
    export_onnx_cmd.add_parser(commands)
    keys_cmd.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format.configure(args.log_level, args.log_format)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"hat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
