"""``python -m transformer.export CKPT OUT_DIR``: a checkpoint as a CTranslate2 model.

torch and ctranslate2 are imported only once the arguments are read (``--help`` is
instant), as in ``cli.py``.
"""

from __future__ import annotations

import argparse
import sys

from transformer.cli import _fail

QUANTIZATIONS = ("float32", "int8", "int8_float32", "bf16")  # as converter.QUANTIZATIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.export" if sys.argv[0].endswith("__main__.py") else None,
        description="Export a checkpoint written by train.py as a CTranslate2 model directory (with its tokenizer "
        "and a README), for translate.py --model OUT_DIR or CTranslate2 itself (docs/exporting.md).",
    )
    parser.add_argument("checkpoint", help="a .pt file written by train.py")
    parser.add_argument("out_dir", help="the folder to write (must not exist, unless --force)")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="float32",
        help="type of the stored weights (default float32): int8 (int8 matrices, ~4x smaller and faster on a "
        "CPU), int8_float32 (the same, non-quantized parts kept in float32), bf16",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier export")
    args = parser.parse_args(argv)

    from transformer.export.converter import ExportError, export_checkpoint
    from transformer.runtime import setup_logging

    setup_logging()
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.quantization, force=args.force)
    except ExportError as e:
        return _fail(str(e))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {args.checkpoint} ({args.quantization}, {size / 2**20:.1f} MiB); translate with: "
          f"python translate.py --model {out}", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
