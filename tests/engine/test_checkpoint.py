import json
import math

import pytest
import torch

from leanformer.engine.checkpoint import (
    load_checkpoint_folder,
    meta_digest,
    restore_training_state,
    save_checkpoint,
    training_state_tensors,
)


def small_run():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


def save(tmp_path, model, optimizer, step=3):
    tensors, groups = training_state_tensors(model, optimizer)
    return save_checkpoint(tmp_path / "last", tensors, {"epoch": 1, "step": step, "param_groups": groups})


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = small_run()
    folder = save(tmp_path, model, optimizer)
    expected_noise = torch.rand(3)
    tensors, meta = load_checkpoint_folder(folder)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restore_training_state(fresh, fresh_opt, tensors, meta["param_groups"])
    assert torch.equal(torch.rand(3), expected_noise)  # RNG state restored to the save point
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 4)
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)  # the next step is identical too: moments and step counts came back


def test_new_save_replaces_old_state_file(tmp_path):
    model, optimizer = small_run()
    save(tmp_path, model, optimizer, step=3)
    save(tmp_path, model, optimizer, step=6)
    assert [p.name for p in (tmp_path / "last").glob("state-*")] == ["state-000000006.safetensors"]
    assert not list((tmp_path / "last").glob("*.tmp"))


def test_truncated_state_is_detected(tmp_path):
    folder = save(tmp_path, *small_run())
    state = next(folder.glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_folder(folder)


def test_flipped_byte_is_detected(tmp_path):
    folder = save(tmp_path, *small_run())
    state = next(folder.glob("state-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[-5] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint_folder(folder)


def test_bad_meta_is_reported(tmp_path):
    folder = save(tmp_path, *small_run())
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint_folder(folder)
    (folder / "meta.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="expected format"):
        load_checkpoint_folder(folder)
    with pytest.raises(ValueError, match="meta.json is missing"):
        load_checkpoint_folder(tmp_path / "nowhere")


def test_written_files_are_readable_by_others(tmp_path):
    folder = save(tmp_path, *small_run())
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_trainable_only_leaves_the_frozen_base_out_and_refuses_other_gaps():
    model, optimizer = small_run()
    model[0].requires_grad_(False)  # a frozen base, as under an adapter
    tensors, groups = training_state_tensors(model, optimizer, trainable_only=True)
    assert not any(k.startswith("model.0.") for k in tensors) and "model.2.weight" in tensors
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    fresh[0].load_state_dict(model[0].state_dict())  # the caller rebuilds the base from its own files
    fresh[0].requires_grad_(False)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restore_training_state(fresh, fresh_opt, tensors, groups)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    del tensors["model.2.weight"]
    with pytest.raises(ValueError, match=r"missing \['2.weight'\]"):
        restore_training_state(fresh, fresh_opt, tensors, groups)


def rewrite_meta(folder, keep_digest: bool = False, **fields) -> dict:
    """Change fields of a checkpoint's meta.json; with keep_digest, recompute its digest as a writer would."""
    path = folder / "meta.json"
    meta = {**json.loads(path.read_text()), **fields}
    if keep_digest:
        meta["meta_sha256"] = meta_digest(meta)
    path.write_text(json.dumps(meta))
    return meta


@pytest.mark.parametrize("fields", [dict(epoch=4), dict(step=30), dict(config={"lr": 1.0}), dict(extra=1)])
def test_an_edited_meta_json_is_refused(tmp_path, fields):
    folder = save(tmp_path, *small_run())
    rewrite_meta(folder, **fields)
    with pytest.raises(ValueError, match=r"meta\.json .*does not match its digest") as err:
        load_checkpoint_folder(folder)
    assert str(folder / "meta.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("field", "value"), [
    ("epoch", "x"), ("epoch", -3), ("epoch", True), ("step", 2.5), ("config", [1, 2]), ("history", {"a": 1}),
    ("history", [1]), ("best_val_acc", 1.5), ("best_val_acc", None), ("param_groups", "x"), ("state_bytes", "9"),
    ("state_sha256", "abc"), ("state_file", "../state-000000003.safetensors"), ("compute", {"a": 1}),
])
def test_every_field_is_validated_naming_file_and_field(tmp_path, field, value):
    folder = save(tmp_path, *small_run())
    rewrite_meta(folder, keep_digest=True, **{field: value})
    with pytest.raises(ValueError, match=rf"meta\.json: field '{field}'") as err:
        load_checkpoint_folder(folder)
    assert str(folder / "meta.json") in str(err.value) and "\n" not in str(err.value)


def test_required_fields_and_step_consistency(tmp_path):
    folder = save(tmp_path, *small_run())
    with pytest.raises(ValueError, match=r"meta\.json: field 'history' is missing"):
        load_checkpoint_folder(folder, require=("history",))
    rewrite_meta(folder, keep_digest=True, step=4)
    with pytest.raises(ValueError, match="state_file"):
        load_checkpoint_folder(folder)


def test_version_1_is_read_with_its_fields_checked(tmp_path):
    folder = save(tmp_path, *small_run())
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["version"] == 2 and len(meta["meta_sha256"]) == 64
    del meta["meta_sha256"]
    (folder / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    assert load_checkpoint_folder(folder)[1]["step"] == 3  # no digest to check: the state checksum still is
    rewrite_meta(folder, epoch="x")
    with pytest.raises(ValueError, match="field 'epoch'"):
        load_checkpoint_folder(folder)


def test_meta_json_is_standard_json(tmp_path):
    model, optimizer = small_run()
    tensors, groups = training_state_tensors(model, optimizer)
    folder = save_checkpoint(tmp_path, tensors, {"step": 1, "param_groups": groups, "history": [{"loss": math.inf}]})
    text = (folder / "meta.json").read_text()
    assert "Infinity" not in text
    assert load_checkpoint_folder(folder)[1]["history"] == [{"loss": None}]
