"""`prosparse` without a loss_fn: the model's own loss wherever it computes one from labels, next-token
cross-entropy on already shifted targets for every causal LM, cross-entropy on logits for our backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformer.sparsity import ProSparseConfig, prosparse
from leanformer.sparsity.prosparse_training import causal_lm_loss, model_loss, task_loss_for

transformers = pytest.importorskip("transformers")


def _bert(cls, **extra):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=60, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    torch.manual_seed(0)
    return cls(config)


def test_task_models_use_their_own_loss():
    model = _bert(transformers.BertForSequenceClassification, num_labels=3).eval()
    ids, labels = torch.randint(0, 60, (4, 6)), torch.tensor([0, 1, 2, 1])
    assert task_loss_for(model) is model_loss
    assert torch.equal(model_loss(model, (ids, labels)), model(ids, labels=labels).loss)
    masked = _bert(transformers.BertForMaskedLM).eval()
    assert task_loss_for(masked) is model_loss
    targets = torch.full((4, 6), -100)
    targets[:, 2] = ids[:, 2]
    torch.testing.assert_close(model_loss(masked, ({"input_ids": ids}, targets)), masked(ids, labels=targets).loss)


def test_every_causal_lm_gets_next_token_cross_entropy_on_shifted_targets():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()  # computes its own loss, but would shift once more
    assert task_loss_for(gpt2) is causal_lm_loss
    ids = torch.randint(0, 50, (2, 9))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.testing.assert_close(causal_lm_loss(gpt2, (inputs, targets)), gpt2(ids, labels=ids).loss)


def test_a_model_with_no_known_loss_is_refused_by_name():
    with pytest.raises(ValueError, match="no task loss known for BertModel"):
        task_loss_for(_bert(transformers.BertModel))


def test_prosparse_trains_a_sequence_classifier_without_a_loss_fn():
    model = _bert(transformers.BertForSequenceClassification, num_labels=2)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 60, (4, 6), generator=gen), torch.randint(0, 2, (4,), generator=gen))
               for _ in range(4)]
    config = ProSparseConfig(steps=4, relu_steps=1, stages=((2, 0.1),), lr=1e-3, eval_every=4, batch_size=4,
                             seq_len=6, threshold=0.0)
    result = prosparse(model, batches, config, batches[:2], progress=False)
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(model(x).logits, y)) for x, y in batches[:2]) / 2
    assert result.final_val_loss == pytest.approx(expected, rel=1e-5)
