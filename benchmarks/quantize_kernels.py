"""The quantiser's three passes, compiled CPU kernels vs the PyTorch reference, on one activation.

The tensor is Swin-T's largest saved activation at batch 16 (the MLP hidden of stage 1: 50,176 tokens x
384 channels, fp32, 73.5 MiB), per-channel groups, stochastic rounding, fresh outputs (as in training).
Each pass is timed interleaved (median of --runs after warm-up); the reference runs with
LEANFORMER_NATIVE=0 in the same process. Writes benchmarks/results/quantize_kernels.json.

    python benchmarks/quantize_kernels.py           # about 20 s
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from leanformer import _native
from leanformer._io import write_json_atomic
from leanformer.memory import quantize as Q

try:
    from benchmarks._common import RESULTS, machine_info, results_file, time_interleaved
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file, time_interleaved


@contextmanager
def reference_path():
    previous = os.environ.get("LEANFORMER_NATIVE")
    os.environ["LEANFORMER_NATIVE"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LEANFORMER_NATIVE"]
        else:
            os.environ["LEANFORMER_NATIVE"] = previous


def passes(x: torch.Tensor, bits: int, reference: bool) -> dict:
    def run(fn):
        def timed():
            if reference:
                with reference_path():
                    fn()
            else:
                fn()
        return timed

    with reference_path() if reference else nullcontext():
        q = Q.quantize(x, bits, "channel")
    return {"statistics": run(lambda: Q.group_minmax(x, "channel")),
            "quantize": run(lambda: Q.quantize(x, bits, "channel")),
            "dequantize": run(lambda: Q.dequantize(q))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="a small tensor: checks the script works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if _native.kernels(Q.KERNEL_SOURCE) is None:
        raise SystemExit("the compiled kernels are not available here (no compiler, or LEANFORMER_NATIVE=0)")
    x = torch.randn(512 if args.quick else 16 * 3136, 384, generator=torch.Generator().manual_seed(0))
    result = {"machine": machine_info(), "shape": list(x.shape), "mib": x.nbytes / 2**20, "runs": args.runs,
              "quick": args.quick, "bits": {}}
    for bits in (8, 4):
        fns = {f"{path} {name}": fn for path in ("native", "reference")
               for name, fn in passes(x, bits, path == "reference").items()}
        timed = time_interleaved(fns, runs=args.runs, warmup=2)
        rows = {}
        for name in ("statistics", "quantize", "dequantize"):
            native, ref = timed[f"native {name}"]["median_s"], timed[f"reference {name}"]["median_s"]
            rows[name] = {"native_ms": 1e3 * native, "reference_ms": 1e3 * ref, "speedup": ref / native}
            print(f"int{bits} {name:<10} native {1e3 * native:7.2f} ms  reference {1e3 * ref:7.2f} ms  "
                  f"{ref / native:5.1f}x")
        result["bits"][str(bits)] = rows
    write_json_atomic(results_file(args.out, "quantize_kernels"), result)
    return result


if __name__ == "__main__":
    main()
