"""Backbone throughput: our Swin-T against timm's in the same process, plus our MS-MLP-T.

MS-MLP has no timm anchor; it is compared with itself computed the reference code's way (ten rolls
and ten small convs per block, BLAS Linear layers).

Forward (eval, no grad) and forward+backward (train mode, sum of logits) images/s, fp32 on the
CPU, the same weights in both Swins, median of `--runs` interleaved runs after `--warmup`. Our
Swin is also timed with its oneDNN Linear path switched off, to show where the gain comes from.
Writes benchmarks/results/backbones.json and backbones.png.

    python benchmarks/backbones.py            # full run (about 2 minutes on 2 cores)
    python benchmarks/backbones.py --quick    # tiny shapes, seconds: checks the script works
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from leanformer import create_model
from leanformer._io import write_json_atomic
from leanformer.models._linear import set_fast_linear

try:
    from benchmarks._common import RESULTS, machine_info, results_file, time_interleaved
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file, time_interleaved

SWIN = "swin_tiny_patch4_window7_224"
QUICK = dict(img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=4)


def build_models(quick: bool) -> dict[str, torch.nn.Module]:
    import timm

    swin_args = QUICK if quick else {}
    theirs = timm.create_model(SWIN, **swin_args)
    ours = create_model(SWIN, **swin_args)
    ours.load_state_dict(theirs.state_dict())
    ours_blas = create_model(SWIN, **swin_args)
    ours_blas.load_state_dict(theirs.state_dict())
    set_fast_linear(ours_blas, False)
    msmlp_args = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1)) if quick else {}
    msmlp = create_model("msmlp_tiny", **msmlp_args)
    msmlp_plain = create_model("msmlp_tiny", fused=False, **msmlp_args)
    msmlp_plain.load_state_dict(msmlp.state_dict())
    set_fast_linear(msmlp_plain, False)
    return {
        "timm swin_tiny": theirs,
        "leanformer swin_tiny": ours,
        "leanformer swin_tiny (BLAS linear)": ours_blas,
        "leanformer msmlp_tiny": msmlp,
        "msmlp_tiny, reference mixer + BLAS linear": msmlp_plain,
    }


def parity(models: dict[str, torch.nn.Module], x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = models["timm swin_tiny"].eval()(x)
        return max(float((models[n].eval()(x) - ref).abs().max()) for n in models if "swin" in n and "timm" not in n)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, mode in zip(axes, ("forward", "forward_backward"), strict=True):
        values = [result["models"][n][mode]["images_per_s"] for n in names]
        bars = ax.barh(names, values, color=["#999999", "#2a6fdb", "#8fb3ee", "#3aa36b", "#a6d8b9"][: len(names)])
        ax.bar_label(bars, fmt="%.1f", padding=3)
        ax.set_title(f"{mode.replace('_', ' + ')}: images/s")
        ax.invert_yaxis()
        ax.margins(x=0.2)
    m = result["machine"]
    fig.suptitle(f"batch {result['batch_size']}, {result['img_size']}px, fp32 — {m['cpu']}, "
                 f"{m['torch_threads']} threads, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per model and mode (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny models and 2 runs: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for backbones.json/.png")
    args = parser.parse_args(argv)
    runs, warmup = (2, 1) if args.quick else (args.runs, args.warmup)
    torch.manual_seed(0)
    models = build_models(args.quick)
    img_size = QUICK["img_size"] if args.quick else 224
    x = torch.randn(args.batch_size, 3, img_size, img_size)

    def forward(model):
        def fn():
            with torch.no_grad():
                model.eval()(x)
        return fn

    def forward_backward(model):
        def fn():
            model.train().zero_grad(set_to_none=True)
            model(x).sum().backward()
        return fn

    result = {"machine": machine_info(), "batch_size": args.batch_size, "img_size": img_size, "runs": runs,
              "warmup": warmup, "quick": args.quick, "max_abs_logit_diff_vs_timm": parity(models, x[:2]),
              "models": {n: {} for n in models}}
    for mode, make in (("forward", forward), ("forward_backward", forward_backward)):
        timings = time_interleaved({n: make(m) for n, m in models.items()}, runs, warmup)
        for name, t in timings.items():
            result["models"][name][mode] = {**t, "images_per_s": round(args.batch_size / t["median_s"], 2)}
    base = result["models"]["timm swin_tiny"]
    result["speedup_vs_timm"] = {
        n: {mode: round(base[mode]["median_s"] / result["models"][n][mode]["median_s"], 3)
            for mode in ("forward", "forward_backward")}
        for n in result["models"] if "swin" in n and not n.startswith("timm")
    }
    path = results_file(args.out, "backbones")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    for name, ratios in result["speedup_vs_timm"].items():
        print(f"{name:<36} forward {ratios['forward']:.2f}x  forward+backward {ratios['forward_backward']:.2f}x timm")
    ms = result["models"]["leanformer msmlp_tiny"]
    ms_ref = result["models"]["msmlp_tiny, reference mixer + BLAS linear"]
    for mode in ("forward", "forward_backward"):
        print(f"msmlp_tiny {mode}: {ms[mode]['images_per_s']} images/s, "
              f"{ms_ref[mode]['median_s'] / ms[mode]['median_s']:.2f}x the reference formulation")
    print(f"max |logit diff| vs timm {result['max_abs_logit_diff_vs_timm']:.2e}")
    return result


if __name__ == "__main__":
    main()
