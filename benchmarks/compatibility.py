"""Every leanformer transform on tiny configs of the model families users bring (transformers, timm, ours).

Each cell builds a fresh tiny model of one family and runs one transform end to end, checking it against the
plain model where there is a reference:

- compress: `compress_activations` (int8): the forward is bit-identical, backward runs, parameters get gradients;
- measure: `measure_sparsity` finds one layer per FFN and counts tokens;
- relufy: every FFN activation becomes ReLU and the forward stays finite;
- sparse: `sparsify_for_inference` exact (sparse path forced) on the relufied model equals its dense outputs;
- prosparse: three `prosparse` steps with the default loss (the model's own where it has one);
- thresholds: `calibrate_thresholds` (TEAL, uniform 30%) changes the outputs, and `save_pretrained` /
  `load_pretrained` gives the same thresholded model back;
- smora: `add_smora` all-linear, then `save_adapter` / `load_adapter` into a fresh model gives the same outputs.

`python benchmarks/compatibility.py` writes benchmarks/results/compatibility.json and .md (the README's table);
tests/test_compatibility.py asserts every cell.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import leanformer
from leanformer._io import atomic_write, write_json_atomic
from leanformer._machine import machine_info
from leanformer.sparsity import ProSparseConfig, find_ffns

TRANSFORMS = ("compress", "measure", "relufy", "sparse", "prosparse", "thresholds", "smora")
# cells refused on purpose, with the words the refusal must contain (anything else failing is a bug)
REFUSED = {("Mixtral", "sparse"): "does not support fused mixture-of-experts weights",
           # TEAL thresholds nn.Linear inputs; GPT-2's Conv1D and ConvNeXt's 1x1 convolutions are not (yet)
           ("GPT-2", "thresholds"): "no nn.Linear inside numbered blocks",
           ("timm ConvNeXt (ConvMlp)", "thresholds"): "no nn.Linear inside numbered blocks"}
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, SEQ, BATCH, IMG = 64, 8, 2, 32


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and how to feed it: ``inputs`` (a model call's batch: tensor or dict) and
    ``targets`` for its task loss."""

    name: str
    source: str  # "transformers", "timm" or "leanformer"
    build: Callable[[], nn.Module]
    kind: str  # "causal_lm", "seq_cls", "seq2seq", "image"
    smora_targets: str | tuple[str, ...] = "all-linear"  # a model whose FFN is 1x1 convs names them


def _hf(cls_name: str, config_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))

    return build


_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                num_labels=3, max_position_embeddings=64)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    return build


def _ours(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return leanformer.create_model(name, num_classes=3, **kwargs)

    return build


def _glu_vit() -> nn.Module:
    from timm.layers import SwiGLUPacked

    return _timm("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2, mlp_layer=SwiGLUPacked,
                 mlp_ratio=2.0)()


def _mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    return MlpMixer(num_classes=3, img_size=IMG, patch_size=8, num_blocks=2, embed_dim=32)


FAMILIES: tuple[Family, ...] = (
    Family("LLaMA", "transformers", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER), "causal_lm"),
    Family("Mistral", "transformers", _hf("MistralForCausalLM", "MistralConfig", **_DECODER), "causal_lm"),
    Family("Mixtral", "transformers", _hf("MixtralForCausalLM", "MixtralConfig", **_DECODER, num_local_experts=2,
                                          num_experts_per_tok=1), "causal_lm"),
    Family("Qwen2", "transformers", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER), "causal_lm"),
    Family("Qwen3", "transformers", _hf("Qwen3ForCausalLM", "Qwen3Config", **_DECODER, head_dim=16), "causal_lm"),
    Family("Gemma", "transformers", _hf("GemmaForCausalLM", "GemmaConfig", **_DECODER, head_dim=16), "causal_lm"),
    Family("Gemma2", "transformers", _hf("Gemma2ForCausalLM", "Gemma2Config", **_DECODER, head_dim=16), "causal_lm"),
    Family("Gemma3", "transformers", _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **_DECODER, head_dim=16),
           "causal_lm"),
    Family("Phi-3", "transformers", _hf("Phi3ForCausalLM", "Phi3Config", **_DECODER, pad_token_id=0), "causal_lm"),
    Family("Granite", "transformers", _hf("GraniteForCausalLM", "GraniteConfig", **_DECODER), "causal_lm"),
    Family("OLMo", "transformers", _hf("OlmoForCausalLM", "OlmoConfig", **_DECODER, pad_token_id=0), "causal_lm"),
    Family("Cohere", "transformers", _hf("CohereForCausalLM", "CohereConfig", **_DECODER, pad_token_id=0),
           "causal_lm"),
    Family("Phi", "transformers", _hf("PhiForCausalLM", "PhiConfig", **_DECODER), "causal_lm"),
    Family("GPT-2", "transformers", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=2,
                                        vocab_size=VOCAB, n_positions=64), "causal_lm"),
    Family("OPT", "transformers", _hf("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=VOCAB, word_embed_proj_dim=32,
                                      max_position_embeddings=64, pad_token_id=1), "causal_lm"),
    Family("GPT-NeoX", "transformers", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
                                           max_position_embeddings=64), "causal_lm"),
    Family("Falcon", "transformers", _hf("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=VOCAB), "causal_lm"),
    Family("BERT", "transformers", _hf("BertForSequenceClassification", "BertConfig", **_ENCODER), "seq_cls"),
    Family("RoBERTa", "transformers", _hf("RobertaForSequenceClassification", "RobertaConfig", **_ENCODER,
                                          pad_token_id=1), "seq_cls"),
    Family("DistilBERT", "transformers", _hf("DistilBertForSequenceClassification", "DistilBertConfig", dim=32,
                                             hidden_dim=64, n_layers=2, n_heads=2, vocab_size=VOCAB, num_labels=3,
                                             max_position_embeddings=64), "seq_cls"),
    Family("ELECTRA", "transformers", _hf("ElectraForSequenceClassification", "ElectraConfig", **_ENCODER,
                                          embedding_size=32), "seq_cls"),
    Family("T5", "transformers", _hf("T5ForConditionalGeneration", "T5Config", d_model=32, d_ff=64, d_kv=16,
                                     num_layers=2, num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0),
           "seq2seq"),
    Family("T5 v1.1 (gated)", "transformers", _hf("T5ForConditionalGeneration", "T5Config", d_model=32, d_ff=64,
                                                  d_kv=16, num_layers=2, num_heads=2, vocab_size=VOCAB,
                                                  decoder_start_token_id=0, feed_forward_proj="gated-gelu"),
           "seq2seq"),
    Family("ViT", "transformers", _hf("ViTForImageClassification", "ViTConfig", hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, image_size=IMG, patch_size=8,
                                      num_labels=3), "image"),
    Family("DeiT", "transformers", _hf("DeiTForImageClassification", "DeiTConfig", hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=IMG, patch_size=8, num_labels=3), "image"),
    Family("timm ViT (Mlp)", "timm", _timm("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2), "image"),
    Family("timm ViT SwiGLU (GluMlp)", "timm", _glu_vit, "image"),
    Family("timm ConvNeXt (ConvMlp)", "timm", _timm("convnext_atto", conv_mlp=True, depths=(1, 1, 1, 1)), "image",
           smora_targets=("fc1", "fc2")),
    Family("timm MLP-Mixer", "timm", _mixer, "image"),
    Family("timm Swin", "timm", _timm("swin_tiny_patch4_window7_224", img_size=IMG, window_size=4, depths=(1, 1),
                                      num_heads=(1, 2), embed_dim=16), "image"),
    Family("leanformer Swin", "leanformer", _ours("swin_nano_patch2_window4_32"), "image"),
    Family("leanformer MS-MLP", "leanformer", _ours("msmlp_tiny", img_size=IMG, embed_dim=20, depths=(1, 1, 1, 1)),
           "image"),
)


def batch_for(family: Family, seed: int = 0) -> tuple[object, torch.Tensor]:
    """(inputs, targets) for one step of ``family``'s task: inputs as the model is called with them."""
    gen = torch.Generator().manual_seed(seed)
    if family.kind == "image":
        return torch.randn(BATCH, 3, IMG, IMG, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ + 1), generator=gen)
    if family.kind == "causal_lm":
        return ids[:, :-1], ids[:, 1:]
    if family.kind == "seq_cls":
        return ids[:, :-1], torch.randint(0, 3, (BATCH,), generator=gen)
    labels = torch.randint(2, VOCAB, (BATCH, 5), generator=gen)  # seq2seq: decoder inputs come from the labels
    return {"input_ids": ids[:, :-1], "decoder_input_ids": labels}, labels


def _call(model: nn.Module, inputs: object):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _output(result) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(result, key):
            return getattr(result, key)
    return result


def check_compress(family: Family) -> str:
    model = family.build().train()
    inputs, _ = batch_for(family)
    torch.manual_seed(0)  # the same dropout / drop-path draws in both forwards
    reference = _output(_call(model, inputs))
    leanformer.compress_activations(model, leanformer.CompressionConfig(bits=8))
    torch.manual_seed(0)
    with leanformer.saved_activation_bytes(model) as report:
        out = _output(_call(model, inputs))
    assert torch.equal(out, reference), "compressed forward differs from the plain one"
    out.float().square().mean().backward()
    assert any(p.grad is not None for p in model.parameters()), "no parameter got a gradient"
    return f"saved-activation ratio {report.ratio:.2f}"


def check_measure(family: Family) -> str:
    model = family.build().eval()
    report = leanformer.measure_sparsity(model, [batch_for(family)])
    assert len(report.layers) == len(find_ffns(model)) > 0
    return f"{len(report.layers)} FFNs, sparsity {report.average_sparsity:.2f}"


def check_relufy(family: Family) -> str:
    model = leanformer.relufy(family.build().eval())
    acts = [ffn.act for ffn in find_ffns(model)]
    assert all(isinstance(a, nn.ReLU) for a in acts)
    with torch.no_grad():
        assert torch.isfinite(_output(_call(model, batch_for(family)[0]))).all()
    return f"{len(acts)} FFNs ReLU"


def check_sparse(family: Family) -> str:
    model = leanformer.relufy(family.build().eval())
    inputs, _ = batch_for(family)
    with torch.no_grad():
        dense = _output(_call(model, inputs))
        # the sparse path, never the dense one
        leanformer.sparsify_for_inference(model, leanformer.SparseInferenceConfig(max_active=1.0))
        sparse = _output(_call(model, inputs))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    return "exact sparse = dense"


def check_prosparse(family: Family) -> str:
    model = family.build()
    batches = [batch_for(family, seed) for seed in range(3)]
    config = ProSparseConfig(steps=3, relu_steps=1, stages=((2, 0.1),), lr=1e-3, eval_every=3, batch_size=BATCH,
                             seq_len=SEQ, threshold=0.01)
    result = leanformer.prosparse(model, batches, config, batches[:1], progress=False)
    assert torch.isfinite(torch.tensor(result.final_val_loss))
    return f"sparsity {result.initial_sparsity:.2f} -> {result.final_sparsity:.2f}"


def _signal(model: nn.Module, inputs: object) -> torch.Tensor:
    """The model's output, or its features when the output is all zero (timm zero-initialises some heads)."""
    out = _output(_call(model, inputs))
    return model.forward_features(inputs) if not out.any() and hasattr(model, "forward_features") else out


def check_thresholds(family: Family) -> str:
    model = family.build().eval()
    batches = [batch_for(family, seed) for seed in range(2)]
    with torch.no_grad():
        dense = _signal(model, batches[0][0])
    report = leanformer.calibrate_thresholds(model, batches, leanformer.ThresholdConfig(sparsity=0.3,
                                                                                         allocation="uniform"))
    with torch.no_grad():
        expected = _signal(model, batches[0][0])
    assert torch.isfinite(expected).all() and not torch.equal(expected, dense), "the thresholds changed nothing"
    with tempfile.TemporaryDirectory() as folder:
        leanformer.save_pretrained(model, folder)
        fresh = leanformer.load_pretrained(folder) if family.source == "transformers" else \
            leanformer.load_pretrained(folder, family.build().eval())
    with torch.no_grad():
        assert torch.equal(_signal(fresh.eval(), batches[0][0]), expected), "reloaded model differs"
    return f"TEAL on {sum(len(g['members']) for g in report.groups.values())} Linears, reloaded equal"


def check_smora(family: Family) -> str:
    model = family.build().eval()
    leanformer.add_smora(model, leanformer.SMoRAConfig(r=4, active_r=2, compute="dense",
                                                       target_modules=family.smora_targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    inputs, _ = batch_for(family)
    with torch.no_grad():
        expected = _output(_call(model, inputs))
    with tempfile.TemporaryDirectory() as folder:
        leanformer.save_adapter(model, folder)
        fresh = leanformer.load_adapter(family.build().eval(), folder)
    with torch.no_grad():
        torch.testing.assert_close(_output(_call(fresh, inputs)), expected)
    layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_router"))
    return f"{layers} layers adapted, reloaded equal"


CHECKS = {"compress": check_compress, "measure": check_measure, "relufy": check_relufy, "sparse": check_sparse,
          "prosparse": check_prosparse, "thresholds": check_thresholds, "smora": check_smora}


def run_cell(family: Family, transform: str) -> dict:
    """{"status": "ok" | "fail", "detail": ..., "seconds": ...} of one family x transform."""
    start = time.perf_counter()
    try:
        detail, status = CHECKS[transform](family), "ok"
    except Exception as err:  # noqa: BLE001 (a cell reports any failure, with its reason)
        detail, status = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300], "fail"
        if "--debug" in sys.argv:
            traceback.print_exc()
    return {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}


def is_expected(family: Family, transform: str, cell: dict) -> bool:
    """A pass, or a refusal listed in `REFUSED` whose message says why."""
    refusal = REFUSED.get((family.name, transform))
    return cell["status"] == "ok" if refusal is None else cell["status"] == "fail" and refusal in cell["detail"]


def _mark(family: Family, transform: str, cell: dict) -> str:
    if cell["status"] == "ok":
        return "✓"
    return "refused" if is_expected(family, transform, cell) else "✗"


def markdown(results: dict[str, dict[str, dict]]) -> str:
    """The family x transform table, then the reason of every cell that did not pass."""
    rows = ["| family | from | " + " | ".join(TRANSFORMS) + " |", "|" + "---|" * (len(TRANSFORMS) + 2)]
    reasons = []
    for family in FAMILIES:
        cells = results[family.name]
        rows.append(f"| {family.name} | {family.source} | " + " | ".join(_mark(family, t, cells[t]) for t in TRANSFORMS)
                    + " |")
        reasons += [f"- {family.name} / {t}: {cells[t]['detail']}" for t in TRANSFORMS if cells[t]["status"] != "ok"]
    return "\n".join(rows + ([""] + reasons if reasons else [])) + "\n"


def main() -> int:
    import transformers

    results = {}
    for family in FAMILIES:
        results[family.name] = {t: run_cell(family, t) for t in TRANSFORMS}
        failed = [t for t, r in results[family.name].items() if r["status"] != "ok"]
        print(f"{family.name:28s} {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    payload = {"machine": machine_info(), "transformers": transformers.__version__,
               "timm": __import__("timm").__version__, "results": results}
    write_json_atomic(RESULTS / "compatibility.json", payload)
    atomic_write(RESULTS / "compatibility.md", lambda tmp: Path(tmp).write_text(markdown(results)))
    print(markdown(results))
    return 0 if all(is_expected(f, t, results[f.name][t]) for f in FAMILIES for t in TRANSFORMS) else 1


if __name__ == "__main__":
    sys.exit(main())
