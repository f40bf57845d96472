# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The paper's FCN and the V-Net: topology counts, parameter count, init statistics, shapes and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from common import transfer
from common.networks import PROBE_NAMES, KarimiFCN, VNet, build_network, count_convs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _expected_parameter_count(f: int = 14, c_in: int = 1, c_out: int = 2) -> tuple[int, int]:
    """Parameter count worked out from DESIGN.md §2's description, independently of the module code.

    A 3x3x3 conv a -> b (with bias) has 27*a*b + b parameters.
    """

    def conv(a: int, b: int) -> int:
        return 27 * a * b + b

    enc = 0
    # level 0: one conv c_in -> f, then 4 convs f -> f
    enc += conv(c_in, f) + 4 * conv(f, f)
    for L in (1, 2, 3):
        w = f * 2**L
        enc += conv(c_in, f) + (L - 1) * conv(f, f)  # the image brought down by L stride-2 convs
        for r in range(L):  # each shallower level r brought down by L - r convs keeping width f*2^r
            enc += (L - r) * conv(f * 2**r, f * 2**r)
        enc += 4 * conv(w, w)  # two residual blocks
    dec = 0
    # (in, skip, out): 112->56 up, cat 56 -> 112; 112->56 up, cat 28 -> 84 -> 56; 56->28 up, cat 14 -> 42 -> 28
    for cin, skip, out in ((8 * f, 4 * f, 8 * f), (8 * f, 2 * f, 4 * f), (4 * f, f, 2 * f)):
        dec += conv(cin, cin // 2) + conv(cin // 2 + skip, out) + 4 * conv(out, out)
    head = conv(2 * f, c_out)
    return enc + dec + head, enc


def test_conv_counts_match_the_paper():
    net = KarimiFCN()
    assert count_convs(net.encoder) == 33  # the paper: 33 encoder convolutions
    assert count_convs(net.decoder) == 18  # the paper: 18 decoder convolutions
    assert count_convs(net.head) == 1


def test_parameter_count():
    net = KarimiFCN(in_channels=1, out_channels=2, features=14, levels=4)
    total, enc = _expected_parameter_count()
    assert sum(p.numel() for p in net.parameters()) == total == 4_656_976  # "about 4.66 M"
    assert sum(p.numel() for p in net.encoder_parameters()) == enc == 1_997_758  # "about 2.0 M in the encoder"
    n_dec = sum(p.numel() for p in net.decoder_parameters())
    assert n_dec + enc == total


def test_output_shape_and_channel_widths():
    net = KarimiFCN(in_channels=1, out_channels=3).eval()
    x = torch.randn(2, 1, 16, 24, 32)
    with torch.no_grad():
        feats = net.encode(x)
        y = net(x)
    assert y.shape == (2, 3, 16, 24, 32)
    assert [t.shape[1] for t in feats] == [14, 28, 56, 112]
    assert [tuple(t.shape[2:]) for t in feats] == [(16, 24, 32), (8, 12, 16), (4, 6, 8), (2, 3, 4)]


#: std of a normal truncated at +-2 std, relative to the untruncated std:
#: sqrt(1 - 2 z phi(z) / (Phi(z) - Phi(-z))) with z = 2 (= 0.8796)
_Z = 2.0
TRUNC_STD_FACTOR = math.sqrt(1 - 2 * _Z * math.exp(-_Z * _Z / 2) / math.sqrt(2 * math.pi) / math.erf(_Z / math.sqrt(2)))


def _check_he_truncated(net: nn.Module) -> int:
    """Every convolution of ``net``: weights drawn He truncated-normal, ``sigma = sqrt(2 / fan_in)`` with
    ``fan_in = c_in * prod(kernel)`` (c_in per group for a convolution, the input channels for a transposed
    one), cut at 2 sigma; biases 0.001. Returns the number of convolutions checked."""
    n_conv = 0
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            continue
        n_conv += 1
        c_in = m.in_channels if isinstance(m, nn.ConvTranspose3d) else m.in_channels // m.groups
        sigma = math.sqrt(2.0 / (c_in * math.prod(m.kernel_size)))
        w = m.weight.detach().double()
        n = w.numel()
        assert w.abs().max() <= 2 * sigma * (1 + 1e-6), name  # the cut (float32 rounding of the bound)
        # the sample std of n draws lies within 5 standard errors (~ std / sqrt(2 n)) of the truncated std;
        # PyTorch's default init (std = 1 / sqrt(3 fan_in), 2.45x smaller) is far outside for every layer
        # with more than a handful of weights
        tol = 5 * TRUNC_STD_FACTOR * sigma / math.sqrt(2 * n)
        assert abs(w.std().item() - TRUNC_STD_FACTOR * sigma) < tol, (name, w.std().item(), TRUNC_STD_FACTOR * sigma)
        assert abs(w.mean().item()) < 5 * TRUNC_STD_FACTOR * sigma / math.sqrt(n), name
        if m.bias is not None:
            assert torch.equal(m.bias, torch.full_like(m.bias, 0.001)), name
    return n_conv


def test_he_truncated_init_statistics():
    torch.manual_seed(0)
    assert _check_he_truncated(KarimiFCN()) == 33 + 18 + 1


@pytest.fixture(scope="module")
def vnet():
    """One ``common.networks.VNet(dropout=0.2)`` (building one takes seconds: 45 M weights drawn); tests use copies."""
    torch.manual_seed(0)
    return VNet(dropout=0.2)


def test_vnet_he_truncated_init(vnet):
    """``common.networks.VNet``: He init like the FCN, for the 5^3 convolutions, the 2^3 down and up (transposed)
    convolutions and the 1^3 head alike."""
    net = vnet
    assert _check_he_truncated(net) == len(net.conv_layers()) == 25
    big = net.get_submodule("down_tr256.ops.0.conv_block.conv")  # 256 * 125 inputs: sigma = 0.00791
    assert big.weight.std().item() == pytest.approx(TRUNC_STD_FACTOR * math.sqrt(2 / (256 * 125)), rel=0.01)


def test_vnet_one_dropout_setting(vnet):
    """One dropout probability for the whole V-Net: MONAI's own uses 0.5 on the up path by default and always
    on the skip connections of its last two up stages."""
    drops = [(n, m.p) for n, m in vnet.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(drops) == 8, drops  # down_tr128/256, up_tr256/128 (2 each), the skips of up_tr64/32
    assert all(q == 0.2 for _, q in drops), drops
    with pytest.raises(ValueError, match="dropout"):
        VNet(dropout=1.0)


@pytest.mark.parametrize("mode", ["frozen_random_encoder", "finetune_decoder", "finetune_encoder"])
def test_vnet_batchnorm_of_frozen_sections_stays_in_eval_mode(mode, vnet, tmp_path):
    """After ``network.train()`` and a training-mode forward pass, the BatchNorm layers of the frozen section
    keep their running statistics (eval mode: they normalise with the source's / the initial statistics), while
    those of the trained section move (training mode)."""
    torch.manual_seed(0)
    src = tmp_path / "source.pt"
    torch.save(vnet.state_dict(), src)
    net = transfer.prepare_network(copy.deepcopy(vnet), mode, str(src) if mode in transfer.SOURCE_MODES else None)
    frozen_names = VNet.ENCODER if mode != "finetune_encoder" else VNet.DECODER
    norms = {n: m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm3d)}
    frozen = {n for n in norms if n.split(".")[0] in frozen_names}
    assert frozen and len(frozen) < len(norms)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in norms.items()}
    net.train()
    assert all(not norms[n].training for n in frozen) and all(norms[n].training for n in set(norms) - frozen)
    net(torch.randn(2, 1, 16, 16, 16) * 3.0 + 1.0)  # batch 2: the deepest stage has 2 values per channel
    for n, m in norms.items():
        same = all(torch.equal(v, before[n][k]) for k, v in m.state_dict().items())
        assert same == (n in frozen), (n, "frozen" if n in frozen else "trained")
    net.eval().train()  # switching back and forth keeps them frozen
    assert all(not norms[n].training for n in frozen)


def test_untrained_logits_not_saturated():
    """Plain-normal He init gives logit std of 13-77 here (100-400 on real data, DESIGN.md §2);
    the truncated init must stay below 25 for a unit-variance input (measured 5-13 over seeds)."""
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    stds = []
    for seed in range(4):
        torch.manual_seed(seed)
        net = KarimiFCN().eval()
        with torch.no_grad():
            stds.append(net(x).std().item())
    assert max(stds) < 25.0, stds
    # softmax not saturated: a clear share of voxels has a foreground probability away from 0 and 1
    with torch.no_grad():
        p = torch.softmax(net(x), 1)[:, 1]
    assert ((p > 0.01) & (p < 0.99)).float().mean() > 0.05


@pytest.mark.parametrize("shape", [(1, 1, 30, 32, 32), (1, 1, 12, 12, 12)])
def test_bad_input_size_clear_error(shape):
    net = KarimiFCN()
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(shape))


def test_bad_input_rank_and_channels():
    net = KarimiFCN()
    with pytest.raises(ValueError, match="5-D"):
        net(torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.zeros(1, 2, 16, 16, 16))


def test_probe_points_and_layer_groups():
    net = KarimiFCN()
    probes = net.probe_modules()
    assert tuple(probes) == PROBE_NAMES
    captured = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.shape)) for n, m in probes.items()]
    with torch.no_grad():
        net.eval()(torch.randn(1, 1, 16, 16, 16))
    for h in hooks:
        h.remove()
    assert captured["encoder-1"][1] == 14 and captured["encoder-3"][1] == 56
    assert captured["decoder-1"][1] == 112 and captured["decoder-3"][1] == 28
    last = net.last_layers(2)
    assert last[-1] is net.head and last[0].weight.shape == (28, 28, 3, 3, 3)
    enc = {id(p) for p in net.encoder_parameters()}
    dec = {id(p) for p in net.decoder_parameters()}
    assert not enc & dec and len(enc) + len(dec) == len(list(net.parameters()))


def test_vnet_alternative_builds():
    net = build_network("vnet", in_channels=1, out_channels=2).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="Unknown network"):
        build_network("unet3000")
