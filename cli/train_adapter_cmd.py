"""`hat train-adapter --model DIR --input-layers K --output-layers M --out ADAPTER`: distil a draft adapter."""
from __future__ import annotations

from hat.common.default_model import DEFAULT_INPUT_LAYERS, DEFAULT_OUTPUT_LAYERS


def add_parser(commands) -> None:
    from hat.common.adapter_train_config import AdapterTrainConfig

    C = AdapterTrainConfig(model_dir="", input_layers=0, output_layers=0, out="")  # the defaults

    p = commands.add_parser("train-adapter", help="distil the device's draft adapter from the full model")
    p.add_argument("--model", required=True, help="the full checkpoint (the teacher): a folder or a store name (`hat pull --list`)")
    p.add_argument("--input-layers", "-K", type=int, default=DEFAULT_INPUT_LAYERS, help="K of the split")
    p.add_argument("--output-layers", "-M", type=int, default=DEFAULT_OUTPUT_LAYERS, help="M of the split")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--width", type=int, default=C.width, help="adapter layer width (0 = the model's hidden size)")
    p.add_argument("--depth", type=int, default=C.depth, help="adapter decoder layers")
    p.add_argument("--intermediate-size", type=int, default=C.intermediate_size, help="adapter MLP width (0 = the model's)")
    p.add_argument("--steps", type=int, default=C.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=C.batch_size, help="windows per step")
    p.add_argument("--seq-len", type=int, default=C.seq_len, help="tokens per window")
    p.add_argument("--lr", type=float, default=C.lr, help="peak learning rate")
    p.add_argument("--ce-weight", type=float, default=C.ce_weight, help="weight of the cross-entropy term")
    p.add_argument("--seed", type=int, default=C.seed)
    p.add_argument("--data", nargs="*", default=[],
                   help="text files or folders to train on, or `sharegpt` (the store's ShareGPT conversations in the "
                        "model's chat template; `hat pull sharegpt`); default: the stdlib corpus")
    p.add_argument("--cache", default=C.cache,
                   help="hidden-state cache folder: the teacher's middle runs once per token, training runs epochs "
                        "over the cache (resumable; reused by later runs with the same model, split and data)")
    p.add_argument("--cache-tokens", type=int, default=C.cache_tokens, help="training tokens the cache holds")
    p.add_argument("--ce-vocab", type=int, default=C.ce_vocab,
                   help="the cross-entropy term scores only the N most frequent training tokens (0 = all)")
    p.add_argument("--save-dtype", default=C.save_dtype, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written adapter weights")
    p.add_argument("--conditioning", default=C.conditioning, choices=("input", "verified"),
                   help="what the adapter sees besides the input part's output and the token: input (nothing) or "
                        "verified (the middle output of the position before, EAGLE's conditioning)")
    p.add_argument("--feature-noise", type=float, default=C.feature_noise,
                   help="verified: Gaussian noise on the previous middle output in training, as a fraction of its RMS")
    p.add_argument("--second-step-weight", type=float, default=C.second_step_weight,
                   help="verified: weight of a second training pass fed the adapter's own estimates (0 = none)")
    p.add_argument("--eval-every", type=int, default=C.eval_every, help="steps between held-out evaluations")
    p.add_argument("--draft-len", type=int, default=C.draft_len, help="longest draft chain in the held-out measure")
    p.add_argument("--eval-windows", type=int, default=C.eval_windows, help="held-out windows for draft agreement")
    p.add_argument("--eval-chains", type=int, default=C.eval_chains, help="held-out prefixes for draft-chain acceptance")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the adapter already in OUT on held-out text")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only fit the drafting confidence temperature of the adapter in OUT and store it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.common.adapter_train_config import AdapterTrainConfig
    from hat.common.adapter_training import evaluate_adapter, train_adapter
    from hat.common.model_store import resolve_model

    from .generate_cmd import set_threads

    set_threads(args.threads)
    config = AdapterTrainConfig(
        model_dir=str(resolve_model(args.model)), input_layers=args.input_layers, output_layers=args.output_layers, out=args.out,
        width=args.width, depth=args.depth, intermediate_size=args.intermediate_size, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, ce_weight=args.ce_weight, seed=args.seed,
        data=args.data, eval_every=args.eval_every, eval_windows=args.eval_windows, eval_chains=args.eval_chains,
        draft_len=args.draft_len, resume=args.resume, cache=args.cache, cache_tokens=args.cache_tokens,
        ce_vocab=args.ce_vocab, save_dtype=args.save_dtype, conditioning=args.conditioning,
        feature_noise=args.feature_noise, second_step_weight=args.second_step_weight)
    if args.eval_only or args.calibrate_only:
        evaluate_adapter(config, calibrate=args.calibrate_only)
        return 0
    summary = train_adapter(config)
    final = summary["final"]
    print(f"adapter written to {args.out}: held-out top-1 agreement {final['top1_agreement']:.3f}, "
          f"greedy draft chains accept {final['accept_len']:.2f} tokens per round; {summary['train_s']:.0f} s of training")
    return 0
