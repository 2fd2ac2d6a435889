"""The model (affectfast.model): heads per task, and every initialization, never downloading."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from affectfast.errors import DataError
from affectfast.model import IMAGENET_FILE, build_model, imagenet_cache_path, parse_init


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, so no test depends on (or fills) the user's real cache."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def _fresh_resnet18_weights(path, seed=123):
    torch.manual_seed(seed)
    state = resnet18(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("tasks", [("va",), ("expr", "au"), ("va", "expr", "au")])
def test_one_head_per_task_with_the_right_width(tasks):
    model = build_model(tasks).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 48, 48).to(memory_format=torch.channels_last)
    outputs = model(images)
    widths = {"va": 2, "expr": 8, "au": 12}
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {t: (2, widths[t]) for t in tasks}


def test_parse_init_forms():
    assert parse_init("scratch") == ("scratch", None)
    assert parse_init("imagenet:/w/r.pth")[1].name == "r.pth"
    assert parse_init("ckpt:runs/a/best.pt")[0] == "ckpt"
    for bad in ("imagenet:", "ckpt", "random", "weights:/x"):
        with pytest.raises(ValueError):
            parse_init(bad)


def test_imagenet_missing_fails_clearly_naming_where_to_put_it(hub_dir):
    with pytest.raises(DataError) as info:
        build_model(("expr",), "imagenet")
    message = str(info.value)
    assert str(hub_dir / "checkpoints" / IMAGENET_FILE) in message and "never downloads" in message
    assert not (hub_dir / "checkpoints").exists()  # nothing fetched, nothing created
    with pytest.raises(DataError, match="not found"):
        build_model(("expr",), f"imagenet:{hub_dir / 'nope.pth'}")


def test_imagenet_from_a_named_file_loads_the_trunk(tmp_path, hub_dir):
    state = _fresh_resnet18_weights(tmp_path / "r18.pth")
    model = build_model(("va", "au"), f"imagenet:{tmp_path / 'r18.pth'}")
    trunk = model.trunk.state_dict()
    for name, value in state.items():
        if not name.startswith("fc."):
            assert torch.equal(trunk[name], value), name


def test_imagenet_from_torchvisions_cache(hub_dir):
    state = _fresh_resnet18_weights(imagenet_cache_path(), seed=7)
    model = build_model(("expr",), "imagenet")
    assert torch.equal(model.trunk.conv1.weight, state["conv1.weight"])


def test_a_file_that_is_not_resnet18_is_a_data_error(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(DataError):
        build_model(("expr",), f"imagenet:{tmp_path / 'bad.pth'}")
    (tmp_path / "junk.pth").write_text("<html>not a checkpoint</html>")
    with pytest.raises(DataError, match="cannot read"):
        build_model(("expr",), f"imagenet:{tmp_path / 'junk.pth'}")


def test_ckpt_init_loads_another_runs_trunk_but_not_its_heads(tmp_path):
    torch.manual_seed(1)
    uni = build_model(("va",))
    torch.save({"format": 1, "model": uni.state_dict()}, tmp_path / "uni.pt")
    torch.manual_seed(2)
    multi = build_model(("va", "expr", "au"), f"ckpt:{tmp_path / 'uni.pt'}")
    for name, value in uni.trunk.state_dict().items():
        assert torch.equal(multi.trunk.state_dict()[name], value), name
    assert not torch.equal(multi.heads["va"].weight, uni.heads["va"].weight)
