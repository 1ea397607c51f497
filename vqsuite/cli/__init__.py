"""Command-line interface (``vqsuite ...``): a thin shell over the library, one module per command.

::

    vqsuite quantize PIPELINE_DIR --preset svdquant-int4 --calib-prompts p.txt --out q/   # + report.txt/json
    vqsuite quantize timm:resnet50 --weights r50.safetensors --preset w8a8 --out r50-w8a8/
    vqsuite generate q/ --prompt "a red fox" --n 4 --steps 20 --compare --out samples/   # PNGs, grid, FP | quantized
    vqsuite generate face-dcgan --preset w4a8 --n 8 --compare --out faces/               # a built-in generator
    vqsuite eval mnist-cnn3 --preset w8a8,w4a16 --metrics agreement,sqnr --out ev/
    vqsuite sweep sweep.toml --out runs/            # resumable; rerun the same command after an interruption
    vqsuite bench gemm --quick                      # CUDA; unknown flags go to benchmarks/gemm.py
    vqsuite presets | formats | info DIR | demo

A user error prints one line (``vqsuite <command>: error: ...``) and exits with code 2; ``--debug`` adds the
traceback. Outputs are written beside the target and renamed into place; a non-empty ``--out`` is refused unless
``--force``, and ``--force`` only ever replaces a folder vqsuite wrote.
"""

from __future__ import annotations
