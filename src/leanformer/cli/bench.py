"""`leanformer bench`: micro-benchmarks on this machine, one subcommand each (sparse-ffn so far)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._io import atomic_write, check_writable_file, dumps_json
from .._machine import check_fits_in_memory, machine_info
from ..sparsity import SPEED_MODES, PredictorConfig, time_sparse_ffn
from ._options import check_positive

FLOAT_BYTES = 4  # the synthetic layers are float32
MIN_LAYERS = 4  # the fewest layers the default --layers cycles through (more only while they are small)
INPUTS_PER_LAYER_CYCLE = 16  # fresh inputs the benchmark draws, each (batch, d_model)

SPARSE_FFN_DESCRIPTION = (
    "Time one FFN call at batch --batch on this CPU: dense PyTorch against leanformer's sparse paths, same weights, "
    "same run. Layers are synthetic (random weights of shape --d-model x --d-ff) with a FATReLU threshold that "
    "leaves each --sparsity share of a token's hidden units at zero; every call gets a fresh input, so a fresh "
    "active set. Modes: exact (compiled kernels when available), exact-torch (PyTorch ops only), predictor (random "
    "low-rank predictors choosing 1 - sparsity of the units: times the path, not its accuracy; gated FFNs only). "
    "Gated (LLaMA) FFNs by default, --plain for BERT/ViT ones. Weights are cycled over --layers layers (default: "
    "at least 4 and 256 MiB) so they do not stay in cache; times are medians of --runs interleaved runs. Prints, "
    "per sparsity, each mode's ms per call, speedup over dense and share of hidden units computed, with the CPU "
    "model and torch threads. Memory: torch itself (about 0.7 GB), the layers (3 x d_model x d_ff x 4 bytes per "
    "gated layer) and one neuron-major copy of their down projections, which every mode shares: about 1 GB at the "
    "default 1024x2816 (well under a minute), about 3.6 GB at LLaMA-7B's 4096x11008 (4 layers); a shape that "
    "would not fit in the memory available is refused, with the estimate, before anything is allocated. "
    "The full sweep with the end-to-end decoding test is benchmarks/sparse_inference.py."
)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="micro-benchmarks on this machine (sparse-ffn)",
                       description="Micro-benchmarks of leanformer's fast paths on this machine; "
                       "`leanformer bench sparse-ffn --help` describes the one there is so far.")
    benches = p.add_subparsers(dest="bench", required=True)
    s = benches.add_parser("sparse-ffn", help="dense vs sparse FFN inference (exact, exact-torch, predictor)",
                           description=SPARSE_FFN_DESCRIPTION)
    s.add_argument("--d-model", type=int, default=1024, help="FFN input and output width (default: %(default)s)")
    s.add_argument("--d-ff", type=int, default=2816, help="FFN hidden units (default: %(default)s)")
    s.add_argument("--sparsity", default="0.5,0.9",
                   help="comma-separated shares of a token's hidden units that are zero, each in [0, 1) "
                   "(default: %(default)s)")
    s.add_argument("--batch", type=int, default=1,
                   help="tokens per call; they share the union of their active units (default: %(default)s)")
    s.add_argument("--plain", action="store_true", help="plain FFNs fc2(act(fc1(x))) instead of gated ones")
    s.add_argument("--modes", default=None,
                   help=f"comma-separated sparse modes among {', '.join(SPEED_MODES)} (default: all of them; "
                   "without predictor with --plain)")
    s.add_argument("--runs", type=int, default=7, help="timed runs; the median is reported (default: %(default)s)")
    s.add_argument("--layers", type=int, default=None,
                   help="layers cycled through (default: enough to flush the caches, at least 4 and 256 MiB)")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    s.add_argument("--plot", type=Path, default=None, help="also write a PNG of speedup vs sparsity to this path")
    s.set_defaults(run=run_sparse_ffn)


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"--sparsity {text!r}: expected comma-separated fractions in [0, 1), e.g. 0.5,0.9")
    return values


def parse_modes(text: str | None, plain: bool) -> tuple[str, ...]:
    if text is None:
        return tuple(m for m in SPEED_MODES if not (plain and m == "predictor"))
    modes = tuple(dict.fromkeys(item.strip() for item in text.split(",")))
    unknown = [m for m in modes if m not in SPEED_MODES]
    if unknown or not modes:
        raise ValueError(f"--modes {text!r}: unknown mode(s) {unknown}; expected some of {', '.join(SPEED_MODES)}")
    if plain and "predictor" in modes:
        raise ValueError("--modes predictor: predictors choose the units of gated FFNs only; with --plain use "
                         f"{', '.join(m for m in SPEED_MODES if m != 'predictor')}")
    return modes


def _pyplot():
    """matplotlib's pyplot on the Agg backend; checked before the measurements so a missing package fails fast."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], modes: tuple[str, ...], machine: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for mode in modes:
        ax.plot([100 * r["sparsity"] for r in rows], [r[mode]["speedup"] for r in rows], marker="o", label=mode)
    ax.axhline(1, color="k", lw=0.8)
    first = rows[0]
    kind = "gated" if first["gated"] else "plain"
    ax.set(xlabel="sparsity (% of hidden units zero per token)", ylabel="speedup vs dense",
           title=f"{kind} FFN {first['d_model']}x{first['d_ff']}, batch {first['batch']}\n"
                 f"{machine['cpu']}, {machine['torch_threads']} torch thread(s)")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def sparse_ffn_bytes(d_model: int, d_ff: int, batch: int, gated: bool, modes: tuple[str, ...],
                     layers: int | None) -> int:
    """Bytes of the tensors one sparse-ffn measurement allocates: per layer its weights, the neuron-major copy of
    its down projection that every mode shares and, in predictor mode, a predictor of the default rank; then the
    inputs and one call's hidden activations. Torch itself (about 0.7 GB) is not counted."""
    weights = 3 * d_model * d_ff if gated else 2 * d_model * d_ff + d_ff + d_model
    down_copy = d_model * d_ff + (0 if gated else d_model)
    rank = PredictorConfig().rank_for(d_model)
    predictor = rank * (d_model + d_ff) + d_ff if "predictor" in modes else 0
    per_layer = weights + down_copy + predictor
    activations = INPUTS_PER_LAYER_CYCLE * batch * d_model + 3 * batch * d_ff
    return FLOAT_BYTES * ((layers or MIN_LAYERS) * per_layer + activations)


def check_sparse_ffn_fits(args: argparse.Namespace, modes: tuple[str, ...]) -> None:
    """Refuse a shape whose tensors exceed this machine's free memory before allocating them: allocation would
    fail with a RuntimeError (or the OOM killer) after the layers before it were built."""
    layers = args.layers or MIN_LAYERS
    needed = sparse_ffn_bytes(args.d_model, args.d_ff, args.batch, not args.plain, modes, args.layers)
    kind = "plain" if args.plain else "gated"
    check_fits_in_memory(needed, f"bench sparse-ffn ({layers} {kind} FFN layers of {args.d_model}x{args.d_ff}, "
                                 f"batch {args.batch}, modes {', '.join(modes)})")


def run_sparse_ffn(args: argparse.Namespace) -> int:
    check_positive(("--d-model", args.d_model), ("--d-ff", args.d_ff), ("--batch", args.batch),
                   ("--runs", args.runs), ("--layers", args.layers))
    sparsities = parse_sparsities(args.sparsity)
    modes = parse_modes(args.modes, args.plain)
    if args.plot is not None:
        check_writable_file(args.plot, "--plot")
        _pyplot()
    check_sparse_ffn_fits(args, modes)
    machine = machine_info()
    rows = [time_sparse_ffn(args.d_model, args.d_ff, sparsity=sparsity, batch=args.batch, gated=not args.plain,
                            modes=modes, runs=args.runs, layers=args.layers) for sparsity in sparsities]
    if args.plot is not None:
        plot(rows, modes, machine, args.plot)
    if args.json:
        print(dumps_json({"machine": machine, "results": rows, "plot": None if args.plot is None else str(args.plot)}))
        return 0
    first = rows[0]
    print(f"{'gated' if first['gated'] else 'plain'} FFN {args.d_model}x{args.d_ff}, batch {args.batch}, "
          f"{first['layers']} layers, median of {args.runs} runs; {machine['cpu']}, {machine['logical_cpus']} "
          f"logical CPUs, {machine['torch_threads']} torch thread(s), torch {machine['torch']}")
    print(f"{'sparsity':>8}  {'mode':<11}  {'ms/call':>8}  {'speedup':>7}  {'units computed':>14}  paths")
    for row in rows:
        print(f"{row['sparsity']:>8.2f}  {'dense':<11}  {1e3 * row['dense_s']:>8.3f}  {'1.00x':>7}  {'100.0%':>14}")
        for mode in modes:
            r = row[mode]
            print(f"{'':>8}  {mode:<11}  {1e3 * r['seconds']:>8.3f}  {r['speedup']:>6.2f}x  "
                  f"{100 * r['computed_fraction']:>13.1f}%  {', '.join(r['paths'])}")
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return 0
