"""How much fp32 rounding alone moves a thresholded model: PyTorch fp32 vs fp64 vs the compiled decoder.

A TEAL threshold makes the model a discontinuous function: an entry that sits on a threshold is kept or zeroed by
its last bit, so two correct fp32 implementations that sum in different orders diverge after a while. This script
measures it on SmolLM2-135M with uniform TEAL at 40%: teacher-forced on one greedy continuation (128 tokens), the
largest logit gap relative to the largest logit and the share of positions with the same argmax between PyTorch
fp32, PyTorch fp64 (the same thresholds, the same weights) and `fast_decoder`. If the decoder is as close to
PyTorch fp32 as PyTorch fp64 is, what remains is the thresholds' own sensitivity, not a decoder error.

    python benchmarks/threshold_rounding.py      # about 2 minutes; writes results/llm_decode/<machine>-rounding.json
"""

from __future__ import annotations

import copy

import torch

from leanformer._io import write_json_atomic
from leanformer._tuning import machine_key
from leanformer.sparsity import DecodeConfig, ThresholdConfig, calibrate_thresholds, fast_decoder

try:
    from benchmarks import llm_decode
    from benchmarks._common import RESULTS, machine_info, results_file
except ImportError:  # run as a script from the benchmarks folder
    import llm_decode
    from _common import RESULTS, machine_info, results_file


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_logit_diff_rel": float((a - b).abs().max() / b.abs().max()),
            "same_argmax": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def main() -> dict:
    torch.set_num_threads(2)
    model, tokenizer, _ = llm_decode.load_model(False)
    calibration, _ = llm_decode.texts(tokenizer, False)
    config = ThresholdConfig(method="teal", sparsity=0.4, allocation="uniform")
    calibrate_thresholds(model, calibration, config)
    prompt = torch.tensor(tokenizer(llm_decode.PROMPT)["input_ids"])
    sequence = torch.cat([prompt, torch.tensor(llm_decode.hf_greedy(model, prompt, 128)[:-1])])
    with torch.no_grad():
        fp32 = model(sequence[None]).logits[0]
        fp64 = copy.deepcopy(model).double()(sequence[None]).logits[0].float()
    decoder = fast_decoder(model, DecodeConfig(max_len=len(sequence) + 1)).logits(sequence)
    payload = {"benchmark": "threshold_rounding", "model": llm_decode.GGUF_NAME, "thresholds": vars(config),
               "positions": len(sequence), "machine": machine_info(),
               "torch_fp64_vs_torch_fp32": compare(fp64, fp32), "decoder_vs_torch_fp32": compare(decoder, fp32),
               "decoder_vs_torch_fp64": compare(decoder, fp64)}
    out = results_file(RESULTS, "llm_decode").with_name(f"{machine_key()}-rounding.json")
    write_json_atomic(out, payload)
    print(f"wrote {out}")
    for key in ("torch_fp64_vs_torch_fp32", "decoder_vs_torch_fp32", "decoder_vs_torch_fp64"):
        print(f"{key:28s} logits within {payload[key]['max_logit_diff_rel']:.2e}, same argmax "
              f"{payload[key]['same_argmax']:.1%}")
    return payload


if __name__ == "__main__":
    main()
