"""The prepared GPU check (issue 16): run once, unattended, on a CUDA machine; see run.sh, which calls it.

Three parts, each timed as a ratio against its anchor in the same run (CUDA-event timing, median of the timed
steps after warm-up), each written to ``OUT/gpu.json`` as soon as it is done (so a run cut short keeps what it
measured), then summarised next to the issue's targets and the published figures in ``OUT/summary.md``, with a
plot in ``OUT/gpu.png``:

1. training memory and step time, Swin-T (ours) and DeiT-S (timm), 224 px, AMP: exact, Mesa-style int8 and
   int4 activation compression, activation checkpointing; peak ``torch.cuda.max_memory_allocated``;
2. batch-1 greedy decoding of a random-weight model of SmolLM2-135M's shape in bf16 (speed does not depend on the
   weights' values), dense vs ProSparse-style ReLU (50% zeros on random weights) and FATReLU (70%) FFNs through
   `sparsify_for_inference`, plus the sparse FFN kernels alone (CATS-style thresholded SiLU gates) at that shape
   and at a 7B (LLaMA-2) FFN shape;
3. one training step of a LLaMA-shaped model with SMoRA r64/k8 (gather and dense compute) vs PEFT LoRA r64.

``--smoke`` runs every part at toy sizes (on the CPU too) to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info  # noqa: E402
from leanformer import create_model  # noqa: E402
from leanformer._io import atomic_write  # noqa: E402
from leanformer.memory import CompressionConfig, compress_activations  # noqa: E402

# Mesa's README (batch 128, RTX 3090, MB, AMP vs Mesa int8) and the targets
MESA_MB = {"swin_t": (11812, 5371), "deit_s": (8459, 3840)}
TARGETS = {"int8_memory": 0.45, "int8_time": 1.10, "int4_memory": 0.35, "decode_speedup_50": 1.5, "smora_vs_lora": 1.0}


def cuda_time(step, warmup: int, runs: int, device: torch.device) -> list[float]:
    """Seconds per call of ``step`` (CUDA events on a GPU, wall clock on the CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def peak_bytes(step, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 1. training memory ------------------------------------------------------------------------------------------


def vision_model(name: str, smoke: bool) -> nn.Module:
    if name == "swin_t":
        kwargs = {"img_size": 32, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4} \
            if smoke else {}
        return create_model("swin_tiny_patch4_window7_224", drop_path_rate=0.1, **kwargs)
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2} if smoke else {}
    return timm.create_model("deit_small_patch16_224", pretrained=False, drop_path_rate=0.1, **kwargs)


def classifier_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    amp: torch.dtype):
    def step():
        with torch.autocast(x.device.type, dtype=amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def training(args, device: torch.device) -> dict:
    size, batch = (32, 8) if args.smoke else (224, 128)
    amp = getattr(torch, args.amp)
    out = {}
    for name in ("swin_t", "deit_s"):
        rows = {}
        for mode in ("exact", "int8", "int4", "checkpoint"):
            torch.manual_seed(0)
            model = vision_model(name, args.smoke).to(device).train()
            if mode == "checkpoint":
                model.set_grad_checkpointing(True)
            elif mode != "exact":
                compress_activations(model, CompressionConfig(bits=8 if mode == "int8" else 4))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)

            step = classifier_step(model, opt, x, y, amp)
            times = cuda_time(step, args.warmup, args.runs, device)
            rows[mode] = {"step_s": statistics.median(times), "runs_s": times, "peak_bytes": peak_bytes(step, device)}
            del model, opt, step
            release(device)
        exact = rows["exact"]
        for row in rows.values():
            row["time_ratio"] = row["step_s"] / exact["step_s"]
            row["memory_ratio"] = row["peak_bytes"] / exact["peak_bytes"] if exact["peak_bytes"] else None
        out[name] = {"batch": batch, "img_size": size, "amp": args.amp, "modes": rows,
                     "mesa_mb": dict(zip(("amp", "int8"), MESA_MB[name], strict=True)),
                     "mesa_int8_memory_ratio": MESA_MB[name][1] / MESA_MB[name][0]}
    return out


# -- 2. sparse decoding --------------------------------------------------------------------------------------------


def smollm2_shape(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def decoding(args, device: torch.device) -> dict:
    from transformers import LlamaForCausalLM

    from leanformer.sparsity import ReLUConfig, SparseInferenceConfig, measure_sparsity, relufy, sparsify_for_inference

    dtype = torch.bfloat16
    torch.manual_seed(0)
    config = smollm2_shape(args.smoke)
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device)
    new_tokens = 8 if args.smoke else 128
    probe = torch.randint(0, config.vocab_size, (2, 64), device=device)

    def tokens_per_s(model) -> tuple[float, torch.Tensor]:
        run = lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.no_grad():
            ids = run()
            times = cuda_time(run, 1, args.runs // 2 or 1, device)
        return new_tokens / statistics.median(times), ids

    dense_speed, _ = tokens_per_s(dense)
    out = {"shape": "SmolLM2-135M (random weights)", "dtype": "bf16", "new_tokens": new_tokens,
           "dense_tokens_per_s": dense_speed, "sparse": {}}
    for sparsity in (0.5, 0.7):
        # ReLU leaves half the gate's outputs zero on random weights; FATReLU's threshold sets the rest
        relu_config = ReLUConfig("relu") if sparsity == 0.5 else \
            ReLUConfig("fatrelu", gate_quantile(dense, probe, sparsity))
        relu = relufy(copy.deepcopy(dense), relu_config)
        measured = measure_sparsity(relu, [probe]).average_sparsity
        _, reference_ids = tokens_per_s(relu)  # the ReLU model on dense kernels: the oracle
        sparse = sparsify_for_inference(copy.deepcopy(relu), SparseInferenceConfig(mode="exact"))
        speed, ids = tokens_per_s(sparse)
        out["sparse"][str(sparsity)] = {"measured_sparsity": measured, "tokens_per_s": speed,
                                        "speedup": speed / dense_speed,
                                        "same_tokens_as_dense_kernels": bool(torch.equal(ids, reference_ids))}
        del relu, sparse
    out["ffn_kernels"] = ffn_kernels(args, device)
    return out


def gate_quantile(model: nn.Module, ids: torch.Tensor, q: float) -> float:
    """The q-quantile of every FFN gate's output on ``ids``: a FATReLU threshold leaving a fraction q of zeros."""
    outputs = []
    hooks = [m.mlp.gate_proj.register_forward_hook(lambda mod, args, out: outputs.append(out.float().flatten()))
             for m in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    pooled = torch.cat(outputs)
    return float(pooled[torch.randperm(pooled.numel(), device=pooled.device)[: 1 << 24]].quantile(q))


def ffn_kernels(args, device: torch.device) -> dict:
    """One gated FFN at batch 1 in bf16: dense (three cuBLAS products) vs the sparse path at fixed sparsities."""
    shapes = {"toy": (64, 160)} if args.smoke else {"smollm2_135m": (576, 1536), "llama2_7b": (4096, 11008)}
    return {name: ffn_speedups(hidden, inter, 20 if args.smoke else 200, device)
            for name, (hidden, inter) in shapes.items()}


def ffn_speedups(hidden: int, inter: int, reps: int, device: torch.device) -> dict:
    import torch.nn.functional as F

    from leanformer.sparsity.kernels import gated_down

    g = torch.Generator(device="cpu").manual_seed(0)
    gate, up = (torch.randn(inter, hidden, generator=g).div_(hidden**0.5).to(device, torch.bfloat16) for _ in range(2))
    down_t = torch.randn(inter, hidden, generator=g).div_(inter**0.5).to(device, torch.bfloat16)
    down = down_t.t().contiguous()
    x = torch.randn(1, hidden, generator=g).to(device, torch.bfloat16)
    a_full = F.silu(x @ gate.t())
    dense_ffn = lambda: (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    row = {"dense_s": statistics.median(cuda_time(dense_ffn, 10, reps, device))}
    for sparsity in (0.0, 0.5, 0.7, 0.9):
        cut = a_full.abs().float().quantile(sparsity) if sparsity else -1.0
        kept = a_full.abs() > cut
        # CATS: the gate's activations below the threshold are zero; up and down are read for the rest only
        sparse_ffn = lambda kept=kept: gated_down(x, F.silu(x @ gate.t()) * kept, up, None, down_t, inter).out
        t = statistics.median(cuda_time(sparse_ffn, 10, reps, device))
        expected = ((a_full * kept) * (x @ up.t())) @ down.t()
        torch.testing.assert_close(sparse_ffn().float(), expected.float(), rtol=3e-2, atol=3e-2)
        row[str(sparsity)] = {"sparse_s": t, "speedup": row["dense_s"] / t}
    return row


# -- 3. SMoRA vs LoRA --------------------------------------------------------------------------------------------


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def adapters(args, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanformer.adapters import SMoRAConfig, add_smora

    if args.smoke:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        batch, seq = 2, 32
    else:  # a LLaMA-shaped 1B-class model, 4 layers (the step time per layer is what compares)
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                             num_attention_heads=16, num_key_value_heads=4)
        batch, seq = 8, 512
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    rows = {}
    for name in ("lora_r64", "smora_r64_k8_gather", "smora_r64_k8_dense"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).train()
        if name == "lora_r64":
            model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=list(targets)))
        else:
            add_smora(model, SMoRAConfig(r=64, active_r=8, target_modules=targets, compute=name.rsplit("_", 1)[1]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = lm_step(model, opt, ids)
        times = cuda_time(step, args.warmup, args.runs, device)
        rows[name] = {"step_s": statistics.median(times), "runs_s": times, "peak_bytes": peak_bytes(step, device)}
        del model, opt, step
        release(device)
    for row in rows.values():
        row["vs_lora"] = row["step_s"] / rows["lora_r64"]["step_s"]
    return {"batch": batch, "seq": seq, "layers": config.num_hidden_layers, "hidden": config.hidden_size, **rows}


# -- summary -------------------------------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def summary(results: dict) -> str:
    lines = ["# leanformer GPU check", "", f"device: {results['machine'].get('gpu', 'cpu')}", ""]
    for name, run in results.get("training", {}).items():
        modes = run["modes"]
        lines.append(f"## {name} training, batch {run['batch']}, {run['img_size']} px, AMP {run['amp']}")
        lines.append("| mode | peak MiB | x exact | step s | x exact |")
        lines.append("| --- | --- | --- | --- | --- |")
        for mode, row in modes.items():
            mib = row["peak_bytes"] / 2**20 if row["peak_bytes"] else float("nan")
            mem = row["memory_ratio"] if row["memory_ratio"] is not None else float("nan")
            lines.append(f"| {mode} | {mib:,.0f} | {mem:.3f} | {row['step_s']:.4f} | {row['time_ratio']:.2f} |")
        lines.append(f"Mesa (RTX 3090): {run['mesa_mb']['amp']:,} -> {run['mesa_mb']['int8']:,} MB "
                     f"({run['mesa_int8_memory_ratio']:.3f}x)")
        if name == "swin_t" and modes["int8"]["memory_ratio"] is not None:
            checks = [("int8 memory", modes["int8"]["memory_ratio"], "int8_memory"),
                      ("int8 time", modes["int8"]["time_ratio"], "int8_time"),
                      ("int4 memory", modes["int4"]["memory_ratio"], "int4_memory")]
            lines.append("targets: " + "; ".join(f"{what} {value:.3f} <= {TARGETS[key]}x: {mark(value <= TARGETS[key])}"
                                                 for what, value, key in checks))
        lines.append("")
    dec = results.get("decoding")
    if dec:
        lines.append(f"## decoding, {dec['shape']}, {dec['dtype']}, batch 1, {dec['new_tokens']} new tokens")
        lines.append(f"dense: {dec['dense_tokens_per_s']:.1f} tokens/s")
        for row in dec["sparse"].values():
            lines.append(f"ReLU-family FFNs at {row['measured_sparsity']:.0%} zeros: {row['tokens_per_s']:.1f} tok/s, "
                         f"{row['speedup']:.2f}x dense; same tokens as on dense kernels: "
                         f"{row['same_tokens_as_dense_kernels']}")
        if "0.5" in dec["sparse"]:
            lines.append(f"target >= {TARGETS['decode_speedup_50']}x at 50%: "
                         f"{mark(dec['sparse']['0.5']['speedup'] >= TARGETS['decode_speedup_50'])}")
        for shape, row in dec.get("ffn_kernels", {}).items():
            cells = ", ".join(f"{s}: {row[s]['speedup']:.2f}x" for s in row if s != "dense_s")
            lines.append(f"FFN kernels alone, {shape}: dense {row['dense_s'] * 1e6:.1f} us; sparse vs dense {cells}")
        lines.append("")
    ada = results.get("adapters")
    if ada:
        lines.append(f"## adapters, LLaMA-shaped ({ada['layers']} layers, hidden {ada['hidden']}), "
                     f"batch {ada['batch']} x {ada['seq']}")
        for name in ("lora_r64", "smora_r64_k8_gather", "smora_r64_k8_dense"):
            row = ada[name]
            mib = row["peak_bytes"] / 2**20 if row["peak_bytes"] else float("nan")
            lines.append(f"{name}: {row['step_s']:.4f} s/step ({row['vs_lora']:.2f}x LoRA), peak {mib:,.0f} MiB")
        best = min(ada["smora_r64_k8_gather"]["vs_lora"], ada["smora_r64_k8_dense"]["vs_lora"])
        lines.append(f"target SMoRA <= {TARGETS['smora_vs_lora']}x LoRA: {mark(best <= TARGETS['smora_vs_lora'])}")
    for part, error in results.get("errors", {}).items():
        lines.append(f"\n{part} FAILED: {error.splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("training", {})
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(5 * max(len(runs), 1), 3.5), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items(), strict=False):
        modes = list(run["modes"])
        ax.bar(modes, [run["modes"][m]["memory_ratio"] or 0 for m in modes], color="tab:blue", label="peak memory")
        ax.plot(modes, [run["modes"][m]["time_ratio"] for m in modes], "o-", color="tab:red", label="step time")
        ax.axhline(run["mesa_int8_memory_ratio"], ls="--", color="grey", label="Mesa int8 memory")
        ax.set_title(f"{name}, batch {run['batch']}: x exact AMP")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu.json, summary.md and gpu.png")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the script (CPU is fine)")
    parser.add_argument("--parts", default="training,decoding,adapters", help="comma-separated parts to run")
    parser.add_argument("--amp", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "torch": torch.__version__, "smoke": args.smoke, "errors": {}}
    if device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name()
    parts = {"training": training, "decoding": decoding, "adapters": adapters}
    for part in args.parts.split(","):
        started = time.perf_counter()
        print(f"[gpu check] {part} ...", flush=True)
        try:
            results[part] = parts[part](args, device)
        except Exception:  # one part failing must not lose the others' figures
            results["errors"][part] = traceback.format_exc()
            print(results["errors"][part], flush=True)
        print(f"[gpu check] {part} done in {time.perf_counter() - started:.0f} s", flush=True)
        write_text(args.out / "gpu.json", json.dumps(results, indent=1, default=str))
    text = summary(results)
    write_text(args.out / "summary.md", text)
    plot(results, args.out / "gpu.png")
    print(text)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
