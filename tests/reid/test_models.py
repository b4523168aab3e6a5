"""FEN / OAN: shapes, stripe geometry, separate branch weights, backbone weight files."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from orgnn.reid import FEN, OAN, PartHead, PartPooling
from orgnn.reid.models import RANDOM_INIT_MESSAGE, build_resnet, load_backbone_state_dict


@pytest.fixture(scope="module")
def fen():
    torch.manual_seed(0)
    return FEN(num_classes=5)


@pytest.fixture(scope="module")
def oan():
    torch.manual_seed(0)
    return OAN()


def test_repr(fen, oan):
    assert repr(fen) == "FEN(5, num_parts=6, dim=256, pool='avg', arch='resnet50')"
    assert repr(oan) == "OAN(num_parts=6, dim=256, in_channels=1, pool='avg', arch='resnet50')"
    assert repr(PartPooling(4, "h")) == "PartPooling(4, axis='h', mode='avg')"


@pytest.mark.parametrize("size,grid", [((384, 128), (24, 8)), ((256, 128), (16, 8))])
def test_fen_shapes(fen, size, grid):
    x = torch.randn(1, 3, *size)
    fen.eval()
    with torch.no_grad():
        shared = fen.trunk(x)
        mh, mv = fen.branch_h(shared), fen.branch_v(shared)
        assert mh.shape == mv.shape == (1, 2048, *grid)  # last stride 1
        feats, logits = fen.heads_forward(torch.cat([fen.pool_h(mh), fen.pool_v(mv)], 2))
    assert feats.shape == (1, 6, 256) and logits.shape == (1, 6, 5)
    with torch.no_grad():
        assert fen(torch.randn(1, 3, 64, 32)).shape == (1, 6, 256)  # eval mode: features


def test_fen_train_mode_outputs(fen):
    fen.train()
    try:
        logits, feats = fen(torch.randn(2, 3, 64, 32))
    finally:
        fen.eval()
    assert logits.shape == (2, 6, 5) and feats.shape == (2, 6, 256)


@pytest.mark.parametrize("size", [(384, 128), (256, 128)])
def test_oan_shapes(oan, size):
    x = (torch.rand(1, 1, *size) > 0.5).float()
    oan.eval()
    with torch.no_grad():
        assert oan(x).shape == (1, 6)
    small = x[:, :, ::6, ::4]
    y = oan.visibility(small)
    assert y.shape == (1, 6) and ((y >= 0) & (y <= 1)).all()
    assert torch.allclose(y, torch.sigmoid(oan(small)))
    with pytest.raises(ValueError, match="expected 1-channel input"):
        oan(torch.rand(1, 3, 64, 32))


def test_stripe_geometry_on_known_map():
    # value of cell (row r, column c) = 100 r + c on a 24×8 map: each part's mean is known
    rows = torch.arange(24.0)[:, None] * 100
    cols = torch.arange(8.0)[None, :]
    fmap = (rows + cols).expand(1, 3, 24, 8)
    h = PartPooling(4, "h")(fmap)[0, 0]
    v = PartPooling(2, "v")(fmap)[0, 0]
    # stripe i = rows 6i..6i+5, all columns; half j = columns 4j..4j+3, all rows
    assert torch.allclose(h, torch.tensor([100 * (6 * i + 2.5) + 3.5 for i in range(4)]))
    assert torch.allclose(v, torch.tensor([100 * 11.5 + 4 * j + 1.5 for j in range(2)]))
    hmax = PartPooling(4, "h", "max")(fmap)[0, 0]
    assert torch.equal(hmax, torch.tensor([100.0 * (6 * i + 5) + 7 for i in range(4)]))
    # one hot cell feeds exactly one stripe and one half
    hot = torch.zeros(1, 1, 24, 8)
    hot[0, 0, 13, 6] = 48.0
    assert torch.equal(PartPooling(4, "h")(hot)[0, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(PartPooling(2, "v")(hot)[0, 0], torch.tensor([0.0, 0.5]))


def test_parts_order_through_network(fen):
    """The network's pooled parts are the stripes (top→bottom) then halves (left→right)."""
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        fen.eval()
        pooled = fen.parts(x)
        shared = fen.trunk(x)
        mh, mv = fen.branch_h(shared), fen.branch_v(shared)
    assert pooled.shape == (1, 2048, 6)
    assert torch.allclose(pooled[..., 0], mh[:, :, :1].mean((2, 3)), atol=1e-6)
    assert torch.allclose(pooled[..., 3], mh[:, :, -1:].mean((2, 3)), atol=1e-6)
    assert torch.allclose(pooled[..., 4], mv[:, :, :, :1].mean((2, 3)), atol=1e-6)
    assert torch.allclose(pooled[..., 5], mv[:, :, :, 1:].mean((2, 3)), atol=1e-6)


def test_branches_do_not_share_weights(fen):
    h = dict(fen.branch_h.named_parameters())
    v = dict(fen.branch_v.named_parameters())
    assert h.keys() == v.keys() and len(h) > 0
    for name in h:
        assert h[name].data_ptr() != v[name].data_ptr(), name
    trunk = {p.data_ptr() for p in fen.trunk.parameters()}
    assert not trunk & {p.data_ptr() for p in fen.branch_h.parameters()}
    heads = [p.data_ptr() for head in fen.heads for p in head.parameters()]
    assert len(heads) == len(set(heads))
    # the branch layers are trained apart: a step on one leaves the other unchanged
    before = fen.branch_v[0].conv1.weight.clone()
    with torch.no_grad():
        fen.branch_h[0].conv1.weight.add_(1.0)
    assert torch.equal(fen.branch_v[0].conv1.weight, before)
    with torch.no_grad():
        fen.branch_h[0].conv1.weight.sub_(1.0)


def test_part_head():
    head = PartHead(16, 8, 3)
    head.eval()
    f, z = head(torch.randn(4, 16))
    assert f.shape == (4, 8) and z.shape == (4, 3) and (f >= 0).all()
    f, _ = PartHead(16, 8, 3, relu=False).eval()(torch.randn(64, 16))
    assert (f < 0).any()


def test_backbone_weights_file(tmp_path, caplog):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    net = FEN(3, arch="resnet18", backbone_weights=path)
    assert torch.equal(net.trunk[0].weight, ref.conv1.weight)
    assert torch.equal(net.branch_h[0].conv1.weight, ref.layer3[1].conv1.weight)
    assert torch.equal(net.branch_v[-1][0].conv1.weight, ref.layer4[0].conv1.weight)
    # nested {"state_dict": ...} with a DataParallel prefix is accepted too
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    assert load_backbone_state_dict(path).keys() == ref.state_dict().keys()
    caplog.set_level(logging.WARNING, logger="orgnn.reid")
    build_resnet("resnet18")
    assert RANDOM_INIT_MESSAGE in caplog.text


def test_wrong_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FEN(3, arch="resnet18", backbone_weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot be read"):
        FEN(3, arch="resnet18", backbone_weights=junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a torchvision resnet18 state dict"):
        FEN(3, arch="resnet18", backbone_weights=other)
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, other)
    with pytest.raises(ValueError, match="shape mismatch for conv1.weight"):
        build_resnet("resnet18", other)
    torch.save([1, 2, 3], other)
    with pytest.raises(ValueError, match="not a state dict"):
        build_resnet("resnet18", other)
    with pytest.raises(ValueError, match="num_parts must be 6"):
        FEN(3, num_parts=8, arch="resnet18")
