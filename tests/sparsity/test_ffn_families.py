"""The FFN layouts people bring (issue 13, section 2): every family of the installed transformers, timm's Mlp /
GluMlp / ConvMlp and ours, through find_ffns, measure_sparsity, relufy, the regulariser, sparse exact inference
and the predictors; the structural fallback for a module nobody listed; bf16/fp16 autocast on the sparse paths."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanformer.sparsity import (
    FFNSpec,
    SparseInferenceConfig,
    SparsityRegularizer,
    TopKConfig,
    apply_topk,
    find_ffns,
    inference_report,
    load_pretrained,
    measure_sparsity,
    record_ffn_activity,
    relufy,
    save_pretrained,
    sparsify_for_inference,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VOCAB = 50
TEXT = {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))}
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
DECODER = {"decoder_input_ids": torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))}
_DECODER_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB)


def _lm(config_name: str, model_name: str = "AutoModelForCausalLM", **overrides):
    def build():
        config = getattr(transformers, config_name)(**{**_DECODER_LM, **overrides})
        model_class = getattr(transformers, model_name)
        return model_class.from_config(config) if model_name.startswith("Auto") else model_class(config)
    return build


def _hf(config_name: str, model_name: str, **kwargs):
    return lambda: getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))


_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0)
_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


class _ConvMlpNet(nn.Module):
    """A tiny NCHW network of timm ConvMlp blocks (1x1 Conv2d FFNs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(timm.layers.ConvMlp(8, 16, act_layer=nn.GELU) for _ in range(2)))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x.mean((2, 3))


def _timm(name: str, **kwargs):
    return lambda: timm.create_model(name, **kwargs)


def _timm_gated(mlp_layer, gate: str):
    """A timm ViT with gated FFNs, their gate re-initialised (timm starts it at weight 0, bias 1: never zero under
    ReLU, which would leave nothing to measure)."""
    def build():
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                                  mlp_layer=mlp_layer)
        for block in model.blocks:
            nn.init.normal_(getattr(block.mlp, gate).weight, std=0.1)
            nn.init.zeros_(getattr(block.mlp, gate).bias)
        return model
    return build


# family -> (build, inputs, number of FFNs, (up, down, gate) attribute paths relative to the FFN module; a gate
# equal to up is a fused gate/up layer)
FAMILIES = {
    # LLaMA-family gated FFNs
    "llama": (_lm("LlamaConfig"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "mistral": (_lm("MistralConfig"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "qwen2": (_lm("Qwen2Config"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "qwen3": (_lm("Qwen3Config", head_dim=8), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "gemma": (_lm("GemmaConfig", head_dim=8, hidden_activation="gelu_pytorch_tanh"), TEXT, 2,
              ("up_proj", "down_proj", "gate_proj")),
    "gemma2": (_lm("Gemma2Config", head_dim=8), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "gemma3": (_lm("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8), TEXT, 2,
               ("up_proj", "down_proj", "gate_proj")),
    "phi3": (_lm("Phi3Config", pad_token_id=0), TEXT, 2, ("gate_up_proj", "down_proj", "gate_up_proj")),
    "granite": (_lm("GraniteConfig"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "olmo": (_lm("OlmoConfig"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "olmo2": (_lm("Olmo2Config"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "cohere": (_lm("CohereConfig"), TEXT, 2, ("up_proj", "down_proj", "gate_proj")),
    "t5_gated": (_hf("T5Config", "T5Model", feed_forward_proj="gated-gelu", **_T5), {**TEXT, **DECODER}, 4,
                 ("wi_1", "wo", "wi_0")),
    "modernbert": (_hf("ModernBertConfig", "ModernBertModel", **_ENCODER, pad_token_id=0), TEXT, 2,
                   ("Wi", "Wo", "Wi")),
    # plain FFNs
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB), TEXT, 2,
             ("c_fc", "c_proj", None)),
    "opt": (_hf("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=VOCAB, word_embed_proj_dim=32), TEXT, 2, ("fc1", "fc2", None)),
    "gpt_neox": (_lm("GPTNeoXConfig"), TEXT, 2, ("dense_h_to_4h", "dense_4h_to_h", None)),
    "falcon": (_hf("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=VOCAB), TEXT, 2, ("dense_h_to_4h", "dense_4h_to_h", None)),
    "phi": (_lm("PhiConfig"), TEXT, 2, ("fc1", "fc2", None)),
    "bert": (_hf("BertConfig", "BertModel", **_ENCODER), TEXT, 2,
             ("intermediate.dense", "output.dense", None)),
    "roberta": (_hf("RobertaConfig", "RobertaModel", **_ENCODER), TEXT, 2,
                ("intermediate.dense", "output.dense", None)),
    "electra": (_hf("ElectraConfig", "ElectraModel", **_ENCODER, embedding_size=32), TEXT, 2,
                ("intermediate.dense", "output.dense", None)),
    "distilbert": (_hf("DistilBertConfig", "DistilBertModel", dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                       vocab_size=VOCAB), TEXT, 2, ("lin1", "lin2", None)),
    "t5": (_hf("T5Config", "T5Model", **_T5), {**TEXT, **DECODER}, 4, ("wi", "wo", None)),
    "vit": (_hf("ViTConfig", "ViTModel", **_VIT), {"pixel_values": IMAGES}, 2, ("fc1", "fc2", None)),
    "deit": (_hf("DeiTConfig", "DeiTModel", **_VIT), {"pixel_values": IMAGES}, 2, ("fc1", "fc2", None)),
    # timm and ours
    "timm_mlp": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10), IMAGES, 2,
                 ("fc1", "fc2", None)),
    "timm_glumlp": (_timm_gated(timm.layers.GluMlp, "fc1"), IMAGES, 2, ("fc1", "fc2", "fc1")),
    "timm_swiglu": (_timm_gated(timm.layers.SwiGLU, "fc1_g"), IMAGES, 2, ("fc1_x", "fc2", "fc1_g")),
    "timm_convnext_conv_mlp": (_timm("convnext_atto", conv_mlp=True, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                     num_classes=10), IMAGES, 4, ("fc1", "fc2", None)),
    "timm_convmlp": (_ConvMlpNet, IMAGES, 2, ("fc1", "fc2", None)),
    "our_swin": (lambda: __import__("leanformer").create_model(
        "swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
        num_classes=10), IMAGES, 4, ("fc1", "fc2", None)),
}
NCHW = {"timm_convnext_conv_mlp", "timm_convmlp"}
# families the sparsity tools handled before (tests/sparsity/test_activations.py and test_inference.py cover their
# relufy and sparse inference); kept here for find_ffns and measure, which now read every layer type alike
COVERED_BEFORE = {"llama", "mistral", "qwen2", "bert", "roberta", "timm_mlp", "our_swin"}
NEW = sorted(set(FAMILIES) - COVERED_BEFORE)


@functools.cache
def _built(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


def model_of(family: str) -> nn.Module:
    """A fresh copy of the family's tiny model (built once per session)."""
    return copy.deepcopy(_built(family))


def _run(model: nn.Module, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@contextmanager
def _ffn_inputs(model: nn.Module) -> Iterator[dict[str, list]]:
    """Inside the block, every FFN's inputs (features last) by FFN name, kept by pre-hooks on the up projections."""
    inputs: dict[str, list] = {}
    handles = [ffn.up.register_forward_pre_hook(
        lambda _m, args, ffn=ffn: inputs.setdefault(ffn.name, []).append(ffn.features_last(args[0]).detach()))
        for ffn in find_ffns(model)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _x1_by_hand(ffn, x: torch.Tensor) -> torch.Tensor:
    """x1 = act(up(x)) or act(gate(x)) * up(x), from the FFN's (out, in) weight views: independent of its forward."""
    def project(role):
        return F.linear(x, ffn.weight(role), ffn.bias(role))

    a = ffn.act(project("gate") if ffn.gated else project("up"))
    return a * project("up") if ffn.gated else a


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_ffns_finds_every_ffn_with_its_layers(family):
    _, _, count, (up, down, gate) = FAMILIES[family]
    model = model_of(family)
    ffns = find_ffns(model)
    assert len(ffns) == count
    for ffn in ffns:
        assert ffn.up is ffn.module.get_submodule(up) and ffn.down is ffn.module.get_submodule(down)
        assert (ffn.gate is None) == (gate is None) and (gate is None or ffn.gate is ffn.module.get_submodule(gate))
        assert ffn.fused == (gate == up)
        assert ffn.weight("up").shape == (ffn.hidden_features, ffn.in_features)
        assert ffn.weight("down").shape == (ffn.out_features, ffn.hidden_features)
        if ffn.gated:
            assert ffn.weight("gate").shape == ffn.weight("up").shape
            assert ffn.weight("gate").data_ptr() != ffn.weight("up").data_ptr()
        assert ffn.feature_dim == (1 if family in NCHW else -1)
    assert len({id(f.down) for f in ffns}) == count


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_measure_sparsity_of_a_relu_model_equals_the_hand_computed_zeros(family):
    _, inputs, _, _ = FAMILIES[family]
    model = relufy(model_of(family))
    with _ffn_inputs(model) as ffn_inputs:
        report = measure_sparsity(model, [inputs])
    for ffn, layer in zip(find_ffns(model), report.layers, strict=True):
        x1 = torch.cat([_x1_by_hand(ffn, x).reshape(-1, ffn.hidden_features) for x in ffn_inputs[ffn.name]])
        assert layer.name == ffn.name and layer.tokens == x1.shape[0]
        assert layer.mean_sparsity == pytest.approx((x1 == 0).double().mean().item(), abs=1e-12)
        assert 0.2 < layer.mean_sparsity < 0.8  # ReLU of random weights: about half


@pytest.mark.parametrize("family", NEW)
def test_relufy_makes_every_ffn_activation_relu_and_the_model_runs(family):
    _, inputs, _, _ = FAMILIES[family]
    model = model_of(family)
    before = _run(model, inputs)
    was_relu = all(type(ffn.act) is nn.ReLU for ffn in find_ffns(model))  # OPT and T5 are ReLU already
    relufy(model)
    assert all(type(ffn.act) is nn.ReLU for ffn in find_ffns(model))
    seen = []
    handles = [ffn.act.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
               for ffn in find_ffns(model)]
    after = _run(model, inputs)
    for handle in handles:
        handle.remove()
    assert seen and all(torch.equal(out, torch.relu(x)) for x, out in seen)
    assert after.shape == before.shape and torch.equal(after, before) == was_relu


@pytest.mark.parametrize("family", NEW)
def test_sparse_exact_inference_equals_the_dense_model(family):
    _, inputs, count, (up, down, gate) = FAMILIES[family]
    model = relufy(model_of(family))
    dense = _run(model, inputs)
    names = [ffn.name for ffn in find_ffns(model)]
    sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    torch.testing.assert_close(_run(model, inputs), dense, atol=2e-5, rtol=1e-4)
    report = inference_report(model)
    # separate gate and up Linears: the whole FFN is replaced; otherwise its down projection
    assert sorted(report) == sorted(names if gate not in (None, up) else [f"{name}.{down}" for name in names])
    assert all(set(r["calls"]) <= {"sparse-native", "sparse-torch"} and r["calls"] for r in report.values())


@pytest.mark.parametrize("family", ["gpt2", "timm_convmlp", "phi3", "opt"])
def test_topk_and_regulariser_work_on_the_ffn_features(family):
    """Top-k runs over the features (channels of an NCHW map); the regulariser's zero fraction is measure's."""
    _, inputs, _, _ = FAMILIES[family]
    model = apply_topk(relufy(model_of(family)), TopKConfig(5))
    counts = []
    handles = [ffn.down.register_forward_pre_hook(
        lambda _m, args, ffn=ffn: counts.append((ffn.features_last(args[0]) != 0).sum(-1))) for ffn in find_ffns(model)]
    measured = measure_sparsity(model, [inputs])
    for handle in handles:
        handle.remove()
    assert all(int(c.max()) <= 5 for c in counts)
    model.train()
    reg = SparsityRegularizer(model, [(10, 1.0)])
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    loss = reg.loss(5)
    reg.remove()
    assert loss.requires_grad and loss > 0 and out is not None
    assert reg.last_sparsity == pytest.approx(measured.average_sparsity, abs=1e-6)


@pytest.mark.parametrize("family", ["distilbert", "falcon", "t5_gated"])
def test_a_relufied_config_reloads_plainly_as_relu(family, tmp_path):
    """DistilBERT and Falcon name their activation `activation`, T5 `dense_act_fn` next to feed_forward_proj."""
    model = relufy(model_of(family))
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    assert all(type(ffn.act) is nn.ReLU for ffn in find_ffns(again))
    _, inputs, _, _ = FAMILIES[family]
    torch.testing.assert_close(_run(again.eval(), inputs), _run(model, inputs))


@pytest.mark.parametrize("family", ["gpt2", "timm_convmlp", "phi3"])
def test_predictor_data_are_the_ffn_tokens_of_every_layout(family):
    """record_ffn_activity reads Conv1D, NCHW and fused gate/up FFNs: inputs and x1 != 0, features last."""
    _, inputs, _, _ = FAMILIES[family]
    model = relufy(model_of(family))
    with _ffn_inputs(model) as ffn_inputs:
        data = record_ffn_activity(model, [inputs])
    for ffn in find_ffns(model):
        x, active = data[ffn.name]
        expected = ffn_inputs[ffn.name][0].reshape(-1, ffn.in_features)
        torch.testing.assert_close(x, expected)
        assert torch.equal(active, _x1_by_hand(ffn, expected) != 0)


def test_predictor_mode_names_what_a_fused_gate_lacks():
    model = relufy(model_of("phi3"))
    with pytest.raises(ValueError, match=r"mode='predictor' supports gated FFNs .*separate gate and up Linears"):
        sparsify_for_inference(model, SparseInferenceConfig("predictor"), {f.name: None for f in find_ffns(model)})


def test_an_nchw_topk_comes_back_from_save_pretrained(tmp_path):
    model = apply_topk(relufy(model_of("timm_convmlp")), TopKConfig(3))
    save_pretrained(model, tmp_path)
    again = load_pretrained(tmp_path, model_of("timm_convmlp"))
    assert [ffn.act[1].dim for ffn in find_ffns(again)] == [1, 1]
    torch.testing.assert_close(_run(again, IMAGES), _run(model, IMAGES))


# --- padding masks: OPT flattens its tokens, T5's decoder has its own length -------------------------------------


def _mean_zeros(rows: list[torch.Tensor]) -> float:
    return torch.cat(rows).eq(0).double().mean().item()


def test_opt_measures_with_an_attention_mask_although_its_ffn_flattens_tokens():
    model = relufy(model_of("opt"))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with _ffn_inputs(model) as ffn_inputs:
        report = measure_sparsity(model, [{**TEXT, "attention_mask": mask}])
    for ffn, layer in zip(find_ffns(model), report.layers, strict=True):
        x1 = _x1_by_hand(ffn, ffn_inputs[ffn.name][0])  # (batch * seq, hidden)
        assert x1.dim() == 2 and layer.tokens == 10
        assert layer.mean_sparsity == pytest.approx(_mean_zeros([x1[mask.reshape(-1).bool()]]), abs=1e-12)
        assert layer.union_active_fraction is not None  # rows viewed as (batch, seq) again
    data = record_ffn_activity(model, [{**TEXT, "attention_mask": mask}])
    assert all(x.shape[0] == 10 for x, _ in data.values())


def test_t5_decoder_ffns_are_not_held_to_the_encoder_mask():
    model = relufy(model_of("t5"))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    decoder_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with _ffn_inputs(model) as ffn_inputs:
        plain = measure_sparsity(model, [{**TEXT, **DECODER, "attention_mask": mask}])
        both = measure_sparsity(model, [{**TEXT, **DECODER, "attention_mask": mask,
                                         "decoder_attention_mask": decoder_mask}])
    ffns = find_ffns(model)
    assert [ffn.in_decoder for ffn in ffns] == [False, False, True, True]  # encoder, then decoder FFNs
    for ffn, layer, masked in zip(ffns, plain.layers, both.layers, strict=True):
        x1 = _x1_by_hand(ffn, ffn_inputs[ffn.name][0])
        keep = (decoder_mask if ffn.in_decoder else mask).bool()
        assert layer.tokens == (8 if ffn.in_decoder else 9)  # every decoder token without a decoder mask
        assert masked.tokens == (6 if ffn.in_decoder else 9)
        assert masked.mean_sparsity == pytest.approx(_mean_zeros([x1[keep]]), abs=1e-12)
    model.train()
    reg = SparsityRegularizer(model, [(10, 1.0)])
    for decoder in (None, decoder_mask):  # the decoder FFNs are never held to the encoder's (2, 6) mask
        with reg.attention_mask(mask, decoder):
            model(**TEXT, **DECODER, attention_mask=mask)
        assert reg.loss(5) > 0


# --- structural fallback, unsupported layers ---------------------------------------------------------------------


class _Unknown(nn.Module):
    """An FFN no table lists: w_in -> nonlin -> w_out (or gated, with a w_gate)."""

    def __init__(self, gated: bool = False):
        super().__init__()
        self.w_in, self.nonlin, self.w_out = nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8)
        self.w_gate = nn.Linear(8, 24) if gated else None

    def forward(self, x):
        h = self.nonlin(self.w_gate(x)) * self.w_in(x) if self.w_gate is not None else self.nonlin(self.w_in(x))
        return x + self.w_out(h)


class _UnknownNet(nn.Module):
    def __init__(self, gated: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.blocks = nn.ModuleList(_Unknown(gated) for _ in range(2))

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("gated", [False, True])
def test_structural_fallback_finds_an_unknown_ffn_and_says_what_it_found(gated):
    model = _UnknownNet(gated).eval()
    with pytest.warns(UserWarning, match=r"found 2 FFN\(s\) by structure: FFNSpec\(classes=\('_Unknown',\), "
                                         r"up='w_in', down='w_out', act='nonlin', gate=" +
                                         ("'w_gate'" if gated else "None")):
        ffns = find_ffns(model)
    assert [f.name for f in ffns] == ["blocks.0", "blocks.1"] and all(f.found_by == "structure" for f in ffns)
    assert all(f.gated == gated for f in ffns)
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        relufy(model)
        assert all(type(block.nonlin) is nn.ReLU for block in model.blocks)
        assert 0 < measure_sparsity(model, [x]).average_sparsity < 1
        dense = _run(model, x)
        sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
    torch.testing.assert_close(_run(model, x), dense, atol=2e-5, rtol=1e-4)
    assert sorted(inference_report(model)) == ["blocks.0.w_out", "blocks.1.w_out"]  # only the down projections
    explicit = find_ffns(_UnknownNet(gated), [FFNSpec(("_Unknown",), up="w_in", down="w_out", act="nonlin")])
    assert all(f.found_by == "specs" and not f.gated for f in explicit)  # FFNSpec stays the override
    ambiguous = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8), nn.ReLU())  # two activations
    with pytest.raises(ValueError, match="no FFN found in Sequential"):
        find_ffns(nn.Sequential(ambiguous))


@pytest.mark.parametrize("layer, message", [
    (nn.Conv1d(8, 24, 1), r"is a Conv1d, expected .*Conv1D.*\(Conv1d is not a layer type the sparsity tools support"),
    (nn.Conv2d(8, 24, 3, padding=1), r"is a 3x3 Conv2d .* an unsupported layer type: only 1x1 Conv2d"),
])
def test_an_unsupported_layer_type_is_named(layer, message):
    block = _Unknown()
    block.w_in = layer
    with pytest.raises(ValueError, match=r"0\.w_in \(up\) " + message):
        find_ffns(nn.Sequential(block), [FFNSpec(("_Unknown",), up="w_in", down="w_out", act="nonlin")])


def test_fused_mixture_of_experts_weights_of_an_unlisted_class_are_refused_by_name():
    """Fused experts of a class the table does not describe (its forward is not known) are refused, not skipped;
    the listed ones (MixtralExperts and kin) are covered in test_moe.py."""
    model = _lm("MixtralConfig", num_local_experts=4, num_experts_per_tok=2)()
    experts = model.model.layers[0].mlp.experts
    experts.__class__ = type("UnlistedExperts", (type(experts),), {})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts is a UnlistedExperts: its experts are "
                                         r"fused 3-D parameters \(gate_up_proj \(4, 128, 32\).*do not support"):
        find_ffns(model)


def test_an_activation_held_as_a_plain_function_is_replaced():
    model = model_of("bert")
    for layer in model.encoder.layer:  # BertIntermediate holds config.hidden_act itself when it is a function
        del layer.intermediate.intermediate_act_fn
        layer.intermediate.intermediate_act_fn = F.gelu
    assert find_ffns(model)[0].act is F.gelu
    apply_topk(model, TopKConfig(4))
    assert all(f.act[1].k == 4 for f in find_ffns(model))
    relufy(model)
    assert all(type(f.act[0]) is nn.ReLU for f in find_ffns(model))
    assert _run(model, TEXT).shape == (2, 6, 32)


# --- autocast on the sparse paths ------------------------------------------------------------------------------


def _output_dtypes(model: nn.Module, names: list[str], inputs) -> list[torch.dtype]:
    dtypes = []
    handles = [model.get_submodule(name).register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
               for name in names]
    _run(model, inputs)
    for handle in handles:
        handle.remove()
    return dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "timm_convmlp"])
def test_sparse_exact_runs_under_autocast(family, dtype):
    """Plain (BERT, GPT-2's Conv1D, a 1x1 Conv2d) and gated (LLaMA) FFNs: the sparse path runs in autocast's dtype
    and every sparse module returns what the dense layer it replaces returns under autocast."""
    _, inputs, _, _ = FAMILIES[family]
    model = relufy(model_of(family))
    dense_model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=dtype):
        dense = _run(model, inputs)
        sparsify_for_inference(model, SparseInferenceConfig(max_active=1.0))
        sparse = _run(model, inputs)
        names = sorted(inference_report(model, reset=True))
        expected, got = _output_dtypes(dense_model, names, inputs), _output_dtypes(model, names, inputs)
    assert sparse.dtype == dense.dtype and got == expected and set(got) == {dtype}
    torch.testing.assert_close(sparse.float(), dense.float(), atol=0.1, rtol=0.05)
    paths = {path for r in inference_report(model).values() for path in r["calls"]}
    assert paths == {"sparse-torch"}  # the sparse path ran, in autocast's dtype (the compiled kernels are fp32)
