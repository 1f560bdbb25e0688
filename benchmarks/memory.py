"""Activation memory: exact vs int8 vs int4 vs per-stage gradient checkpointing, on training steps.

For each model (`swin_tiny_patch4_window7_224`, `msmlp_tiny`; fp32, batch 16 at 224 px, same
weights and data) and each variant:

- saved-activation bytes (what autograd keeps for backward, `saved_activation_bytes`) and the
  ratio to exact: measured in this process (not for checkpointing, whose recomputation keeps
  tensors outside saved-tensor hooks);
- process peak memory (VmHWM) and step time (median of `--steps` after warm-up): each
  variant in its own fresh process, so peaks do not mix, repeated for `--rounds` rounds with the
  variants interleaved (step time: median over all rounds' steps; peak: the largest round's);
  also the step peak, the peak minus the
  resident memory once the model and batch exist (what training adds on top of the runtime and
  weights, closer to what a GPU allocator would report);
- parameter-gradient relative L2 error against exact on the same batch (int8/int4/int2);
- exact/int8/int4 again with the "lowmem" allocator settings (`ALLOCATORS`), which return freed
  memory to the system at once: on CPU the saved bytes become a lower process peak only then.

Writes benchmarks/results/memory.json and memory.png.

    python benchmarks/memory.py            # full run (several minutes on 2 cores)
    python benchmarks/memory.py --quick    # tiny shapes: checks the script works
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from leanformer import create_model
from leanformer._io import write_json_atomic
from leanformer._process import current_rss_mb, peak_rss_mb, reset_peak_rss
from leanformer.memory import CompressionConfig, compress_activations, saved_activation_bytes

try:
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    from _common import RESULTS, machine_info, results_file

MODELS = ("swin_tiny_patch4_window7_224", "msmlp_tiny")
VARIANTS = ("exact", "int8", "int4", "checkpoint")
# glibc keeps freed activation memory in its heap (fast reuse, high peak); "lowmem" mmaps every block over
# 128 KiB so frees return memory at once, with torch's 2 MB pages to make re-faulting it cheap.
ALLOCATORS = {"default": {}, "lowmem": {"MALLOC_MMAP_THRESHOLD_": "131072", "THP_MEM_ALLOC_ENABLE": "1"}}
LOWMEM_VARIANTS = ("exact", "int8", "int4")
QUICK_ARGS = {"swin_tiny_patch4_window7_224": dict(img_size=32, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                                                   window_size=4),
              "msmlp_tiny": dict(img_size=32, embed_dim=20, depths=(1, 1), mix_size=[[1, 1, 3, 5, 7]] * 2)}


def build(name: str, variant: str, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, drop_path_rate=0.0, **(QUICK_ARGS[name] if quick else {})).train()
    if variant == "checkpoint":
        model.set_grad_checkpointing(True)
    elif variant != "exact":
        compress_activations(model, CompressionConfig.from_name(variant))
    return model


def batch(model: torch.nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, model.img_size, model.img_size, generator=generator)
    return x, torch.randint(0, model.num_classes, (batch_size,), generator=generator)


def train_step(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def worker(name: str, variant: str, batch_size: int, steps: int, quick: bool) -> dict:
    """Runs in a fresh process: step time and peak memory of one variant alone."""
    model = build(name, variant, quick)
    x, y = batch(model, batch_size)
    base = current_rss_mb()
    reset_peak_rss()
    for _ in range(2):
        train_step(model, x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, x, y)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "steps_s": [round(t, 4) for t in times],
            "peak_rss_mb": peak_rss_mb(), "before_steps_rss_mb": base,
            "step_peak_mb": peak_rss_mb() - base if base is not None else None}


def in_fresh_process(name: str, variant: str, args, allocator: str = "default") -> dict:
    cmd = [sys.executable, __file__, "--worker", name, variant, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    env = {**os.environ, **ALLOCATORS[allocator]}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_rounds(name: str, args, variants: tuple[str, ...], allocator: str) -> dict[str, dict]:
    """Each variant in fresh processes, variants interleaved round by round so drifting load hits all alike."""
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in variants:
            runs[variant].append(in_fresh_process(name, variant, args, allocator))
    out = {}
    for variant, rounds in runs.items():
        steps = [t for r in rounds for t in r["steps_s"]]
        worst = max(rounds, key=lambda r: r["peak_rss_mb"])
        out[variant] = {**worst, "step_s": statistics.median(steps), "steps_s": steps}
    return out


def add_ratios(rows: dict[str, dict]) -> None:
    """Peak, step time and step peak of each timed variant relative to exact (same allocator)."""
    exact = rows["exact"]
    for row in rows.values():
        if "step_s" not in row:
            continue
        row["peak_ratio"] = row["peak_rss_mb"] / exact["peak_rss_mb"]
        row["time_ratio"] = row["step_s"] / exact["step_s"]
        if exact.get("step_peak_mb"):
            row["step_peak_ratio"] = row["step_peak_mb"] / exact["step_peak_mb"]


def grads(model, x, y) -> dict[str, torch.Tensor]:
    train_step(model, x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def in_process_figures(name: str, args) -> dict:
    """Saved bytes per variant and gradient error vs exact, same weights and batch."""
    exact_model = build(name, "exact", args.quick)
    x, y = batch(exact_model, args.batch_size)
    with saved_activation_bytes(exact_model) as exact_report:
        exact_model(x)
    exact_grads = grads(exact_model, x, y)
    out = {"exact": {"saved_mb": exact_report.stored_bytes / 2**20, "saved_ratio": 1.0, "grad_rel_error": 0.0}}
    for variant in ("int8", "int4", "int2"):
        model = compress_activations(copy.deepcopy(exact_model), CompressionConfig.from_name(variant))
        train_step(model, x, y)  # first batch initialises the running ranges, as in training
        with saved_activation_bytes(model) as report:
            model(x)
        got = grads(model, x, y)
        num = sum(float((got[k] - exact_grads[k]).pow(2).sum()) for k in exact_grads)
        den = sum(float(exact_grads[k].pow(2).sum()) for k in exact_grads)
        out[variant] = {"saved_mb": report.stored_bytes / 2**20, "saved_ratio": report.stored_bytes /
                        exact_report.stored_bytes, "grad_rel_error": (num / den) ** 0.5}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    colors = {"exact": "#999999", "int8": "#2a6fdb", "int4": "#8fb3ee", "checkpoint": "#3aa36b"}
    panels = (("saved_mb", "saved activations (MiB)", False), ("peak_rss_mb", "process peak (MB)", False),
              ("peak_rss_mb", "process peak, lowmem allocator (MB)", True), ("step_s", "step time (s)", False))
    for ax, (metric, label, lowmem) in zip(axes, panels, strict=True):
        width = 0.2
        for i, variant in enumerate(VARIANTS):
            rows = [result["models"][m][variant] for m in result["models"]]
            values = [(row.get("lowmem", {}) if lowmem else row).get(metric) or 0 for row in rows]
            ax.bar([j + i * width for j in range(len(values))], values, width, label=variant, color=colors[variant])
        ax.set_xticks([j + 1.5 * width for j in range(len(result["models"]))],
                      [m.split("_patch")[0] for m in result["models"]])
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"training step, batch {result['batch_size']}, fp32 — {m['cpu']}, {m['torch_threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, interleaved")
    parser.add_argument("--no-lowmem", action="store_true", help="skip the runs with the memory-returning allocator")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test, not a result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, args.steps, args.quick)))
        return None
    result = {"machine": machine_info(), "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
              "allocators": ALLOCATORS, "quick": args.quick, "models": {}}
    for name in MODELS:
        figures = in_process_figures(name, args)
        timed = interleaved_rounds(name, args, VARIANTS, "default")
        rows = {variant: {**figures.get(variant, {}), **timed[variant]} for variant in VARIANTS}
        rows["int2"] = figures["int2"]
        add_ratios(rows)
        if not args.no_lowmem:
            lowmem = interleaved_rounds(name, args, LOWMEM_VARIANTS, "lowmem")
            add_ratios(lowmem)
            for variant, row in lowmem.items():
                rows[variant]["lowmem"] = row
        result["models"][name] = rows
        for variant, row in rows.items():
            print(f"{name:<30} {variant:<10} " + "  ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    path = results_file(args.out, "memory")
    write_json_atomic(path, result)
    plot(result, path.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
