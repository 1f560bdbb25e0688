"""A model too large for the machine is refused before anything is allocated, with the estimate and the memory."""

from __future__ import annotations

import pytest

from leanformer import create_model
from leanformer._machine import available_memory_bytes
from leanformer.cli.main import main
from leanformer.models._registry import model_entrypoint, weight_bytes


def test_weight_bytes_counts_parameters_and_buffers():
    model = create_model("swin_nano_patch2_window4_32")
    expected = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert weight_bytes(lambda: model_entrypoint("swin_nano_patch2_window4_32")()) == expected


def test_an_absurd_size_is_refused_with_the_estimate():
    assert available_memory_bytes() is not None
    with pytest.raises(ValueError, match=r"needs about [\d,.]+ GiB, but this machine has [\d,.]+ GiB of memory"):
        create_model("swin_nano_patch2_window4_32", embed_dim=960000)


def test_the_cli_says_it_in_one_line(capsys, tmp_path):
    code = main(["train", "--model-arg", "embed_dim=960000", "--epochs", "1", "--no-progress",
                 "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "GiB of memory available" in err and len(err.strip().splitlines()) == 1
