"""`hat convert-gguf FILE.gguf --out DIR [--dtype D]`: a GGUF into a transformers checkpoint folder."""
from __future__ import annotations


def add_parser(commands) -> None:
    p = commands.add_parser("convert-gguf", help="convert a GGUF file (Llama, Mistral, Qwen2, Qwen3; llama.cpp's or "
                                                 "Ollama's) into a transformers checkpoint folder")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the weights' dtype; quantized tensors are dequantized to it")
    p.set_defaults(run=run)


def run(args) -> int:
    from hat.common.gguf_import import convert_gguf

    print(convert_gguf(args.gguf, args.out, args.dtype))
    return 0
