"""`hat split MODEL_DIR --input-layers K --output-layers M --out BUNDLE`."""
from __future__ import annotations


def add_parser(commands) -> None:
    p = commands.add_parser("split", help="cut a checkpoint into a device bundle and a cloud bundle")
    p.add_argument("model_dir", help="a transformers checkpoint folder (config.json + *.safetensors + tokenizer), or a store name "
                                          "(`hat pull --list`: smollm2-135m-instruct, reference)")
    p.add_argument("--input-layers", "-K", type=int, required=True, help="decoder layers on the device before the cloud")
    p.add_argument("--output-layers", "-M", type=int, required=True, help="decoder layers on the device after the cloud")
    p.add_argument("--out", required=True, help="bundle folder: OUT/device and OUT/cloud are written")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast weights (default: as stored)")
    p.add_argument("--adapter", help="draft adapter folder for the device bundle (default: MODEL/adapters/kK-mM if the "
                                     "checkpoint ships one)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.common.bundle import load_manifest
    from hat.common.split import split_checkpoint

    device_dir, cloud_dir = split_checkpoint(args.model_dir, args.input_layers, args.output_layers, args.out, args.dtype,
                                             args.adapter)
    m = load_manifest(device_dir)
    first, last = m.middle_layers
    print(f"device bundle: {device_dir}  (embedding, layers [0, {first}), layers [{last}, {m.num_layers}), norm, head, tokenizer)")
    print(f"cloud bundle:  {cloud_dir}  (layers [{first}, {last}))")
    adapter = "a draft adapter (speculative decoding)" if (device_dir / "adapter").is_dir() else "no draft adapter (no speculation)"
    print(f"the device bundle carries {adapter}")
    print(f"source fingerprint {m.source_fingerprint[:16]}…, dtype {m.dtype}")
    return 0
