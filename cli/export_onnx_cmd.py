"""`hat export-onnx --bundle BUNDLE/device [--dtype float32|float16] [--opset N]`: the device's parts as ONNX graphs."""
from __future__ import annotations


def add_parser(commands) -> None:
    from hat.device.onnx_export import DEFAULT_OPSET

    p = commands.add_parser("export-onnx", help="export the device bundle's parts to ONNX (BUNDLE/onnx) for "
                                                "`--backend onnxruntime`")
    p.add_argument("--bundle", required=True, help="device bundle folder (BUNDLE/device from `hat split`)")
    p.add_argument("--dtype", choices=["float32", "float16"],
                   help="compute dtype of the graphs (default: the bundle's; float32 for a bfloat16 bundle, which "
                        "onnxruntime's Python API cannot feed). float16 halves the files and suits GPUs")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help="ONNX opset (the default takes standard ops only, as JetPack's onnxruntime and TensorRT want)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.device.onnx_export import export_onnx

    manifest = export_onnx(args.bundle, args.dtype, args.opset)
    print(f"ONNX graphs ({manifest.dtype}, opset {manifest.opset}) in {args.bundle}/onnx: "
          f"{', '.join(manifest.graphs.values())}; run the agent with --backend onnxruntime")
    return 0
