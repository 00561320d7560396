"""Toy encoders, prototype heads and the sklearn-digits tasks used by the editing experiments."""

from __future__ import annotations

import pytest
import torch

from layerwise.editing.lines import discover_blocks
from layerwise.errors import ParameterError
from layerwise.tangent.linearize import LinearizedModel
from layerwise.tangent.toy_models import PrototypeHead, TinyCNN, TinyViT, build_encoder, class_prototypes

pytest.importorskip("sklearn")
from layerwise.tangent import toy_tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_encoders_shapes_blocks_and_linearization(kind):
    torch.manual_seed(0)
    enc = build_encoder(kind, depth=3, out_dim=8)
    x = torch.rand(5, 1, 16, 16)
    assert enc(x).shape == (5, 8)
    layout = discover_blocks([k for k, _ in enc.named_parameters()])
    assert layout.towers == {"blocks.": 3}
    assert all(k.startswith("blocks.") for k in layout.depth)
    if kind == "vit":
        assert layout.depth["blocks.2.mlp.0.weight"] == ("blocks.", 2)  # mlp.0 is not block 0
    assert not list(enc.buffers())  # no batch statistics: the linearized model is exact
    torch.testing.assert_close(LinearizedModel(enc)(x), enc(x))


def test_bad_encoder_arguments():
    with pytest.raises(ParameterError, match="patch_size"):
        TinyViT(image_size=16, patch_size=5)
    with pytest.raises(ParameterError, match="heads"):
        TinyViT(dim=30, heads=4)
    with pytest.raises(ParameterError, match="kind"):
        build_encoder("resnet")
    assert isinstance(build_encoder("cnn"), TinyCNN)


def test_prototype_head_is_a_centered_cosine_classifier():
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    center = torch.tensor([0.5, 0.5])
    head = PrototypeHead(protos, scale=5.0, center=center)
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    zc = (z - center) / (z - center).norm(dim=1, keepdim=True)
    pc = (protos - center) / (protos - center).norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(z), 5.0 * zc @ pc.T)
    plain = PrototypeHead(protos, scale=5.0)
    assert not torch.allclose(plain(z), head(z))
    assert not any(p.requires_grad for p in head.parameters())
    with pytest.raises(ParameterError, match="center"):
        PrototypeHead(protos, center=torch.zeros(3))
    with pytest.raises(ParameterError, match="prototypes"):
        PrototypeHead(torch.zeros(3))


def test_class_prototypes_are_class_means():
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    torch.testing.assert_close(class_prototypes(feats, labels, 2), torch.tensor([[2.0, 1.0], [0.0, 5.0]]))
    with pytest.raises(ParameterError, match="lack classes"):
        class_prototypes(feats, labels, 3)


def test_tasks_are_deterministic_disjoint_from_pretraining_and_transformed():
    tasks = toy_tasks.make_tasks(["rot90", "upright", "stripes"], seed=3, n_train=40, n_val=20, n_test=20)
    again = toy_tasks.make_tasks(["rot90", "upright", "stripes"], seed=3, n_train=40, n_val=20, n_test=20)
    other = toy_tasks.make_tasks(["rot90"], seed=4, n_train=40, n_val=20, n_test=20)
    for name, t in tasks.items():
        assert t.train[0].shape == (40, 1, 16, 16) and t.val[1].shape == (20,)
        assert 0 <= float(t.train[0].min()) and float(t.train[0].max()) <= 1
        assert int(t.train[1].max()) < t.num_classes
        assert torch.equal(t.train[0], again[name].train[0])
    assert not torch.equal(tasks["rot90"].train[0], other["rot90"].train[0])
    torch.testing.assert_close(
        tasks["rot90"].train[0], torch.rot90(tasks["upright"].train[0], 1, dims=(2, 3))
    )
    assert torch.equal(tasks["rot90"].train[1], tasks["upright"].train[1])
    pre, down = toy_tasks._pools()
    assert not set(pre.tolist()) & set(down.tolist())
    assert len(pre) + len(down) == 1797
    with pytest.raises(ParameterError, match="tasks"):
        toy_tasks.make_tasks(["imagenet"])
    with pytest.raises(ParameterError, match="n_train"):
        toy_tasks.make_tasks(["rot90"], n_train=800, n_val=100, n_test=100)


def test_pretraining_data_and_pretraining_learns():
    x, y = toy_tasks.pretraining_data(64, seed=0)
    assert x.shape == (64, 1, 16, 16) and torch.equal(x, toy_tasks.pretraining_data(64, seed=0)[0])
    torch.manual_seed(0)
    enc = TinyCNN(width=4, depth=2, out_dim=8)
    start = {k: v.clone() for k, v in enc.state_dict().items()}
    toy_tasks.pretrain_encoder(enc, 15, batch_size=32, lr=3e-3, seed=0)
    assert not enc.training
    assert any(not torch.equal(start[k], v) for k, v in enc.state_dict().items())


def test_docstring_examples():
    import doctest
    import importlib

    for name in ("toy_models",):
        result = doctest.testmod(importlib.import_module(f"layerwise.tangent.{name}"))
        assert result.failed == 0 and result.attempted > 0, name
