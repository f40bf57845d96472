"""Training pieces: the loss goes down, transfer modes freeze what they should, the decay rule fires when it should."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.losses import DiceLoss

from common import transfer
from common.handlers import DecayRule, PlateauDecay
from common.networks import KarimiFCN


def _sphere_task(n: int = 4, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bright spheres of random centre and radius in Gaussian noise: (image (1,1,s,s,s), label (1,1,s,s,s))."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    out = []
    for _ in range(n):
        c = 4 + torch.rand(3, generator=g) * (size - 8)
        r = 3 + torch.rand(1, generator=g) * 2
        lab = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r**2).float()
        img = lab * 2.0 + 0.3 * torch.randn(lab.shape, generator=g)
        out.append((img[None, None], lab[None, None]))
    return out


def _loss_fn() -> DiceLoss:
    # the bundles' negative soft foreground Dice (1 - Dice, smooth 1e-5)
    return DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)


def test_dice_loss_is_one_minus_foreground_dice():
    # a perfect, saturated prediction has loss ~0; the inverse prediction ~1
    lab = torch.zeros(1, 1, 8, 8, 8)
    lab[..., 2:6, 2:6, 2:6] = 1
    logits = torch.cat([(1 - lab) * 50, lab * 50], dim=1)
    assert _loss_fn()(logits, lab).item() < 1e-4
    assert _loss_fn()(logits.flip(1), lab).item() > 1 - 1e-4


def test_a_few_dozen_steps_lower_the_loss():
    torch.manual_seed(0)
    data = _sphere_task()
    net = KarimiFCN(dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)  # the paper's learning rate
    loss_fn = _loss_fn()
    losses = []
    for step in range(36):
        img, lab = data[step % len(data)]
        opt.zero_grad()
        loss = loss_fn(net(img), lab)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert first > 0.8 and last < 0.3 * first, (first, last)  # seen: 0.87 -> 0.05


def _train_steps(net: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.Adam(transfer.trainable_parameters(net), lr=1e-3)
    data = _sphere_task(n=2)
    for s in range(steps):
        img, lab = data[s % 2]
        opt.zero_grad()
        _loss_fn()(net(img), lab).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["frozen_random_encoder", "finetune_last_k", "finetune_encoder", "finetune_decoder"])
def test_frozen_parameters_stay_bit_identical(mode, tmp_path):
    torch.manual_seed(1)
    src = tmp_path / "source.pt"
    torch.save(KarimiFCN().state_dict(), src)
    torch.manual_seed(2)
    net = transfer.prepare_network(KarimiFCN(), mode, str(src) if mode in transfer.SOURCE_MODES else None, last_k=2)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen, "the mode froze nothing"
    _train_steps(net)
    for n, p in net.named_parameters():
        if n in frozen:
            assert p.grad is None, f"{n} received a gradient"
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"
    changed = [n for n, p in net.named_parameters() if n not in frozen and not torch.equal(p.detach(), before[n])]
    assert changed, "no trainable parameter changed"
    if mode == "finetune_last_k":
        assert sorted(n for n in before if n not in frozen) == sorted(
            ["head.weight", "head.bias", "decoder.2.residual.block2.1.conv.weight", "decoder.2.residual.block2.1.conv.bias"]
        )
    if mode in ("frozen_random_encoder", "finetune_decoder", "finetune_last_k"):
        assert net.encoder_frozen
        assert frozen >= {n for n in before if n.startswith("encoder.")}


def test_frozen_encoder_builds_no_graph_through_the_encoder():
    net = transfer.prepare_network(KarimiFCN(), "frozen_random_encoder")
    feats = []
    h = net.encoder[3].register_forward_hook(lambda m, i, o: feats.append(o))
    net(torch.randn(1, 1, 16, 16, 16))
    h.remove()
    assert feats[0].grad_fn is None and not feats[0].requires_grad


def test_finetune_loads_source_and_halves_lr(tmp_path):
    torch.manual_seed(3)
    source = KarimiFCN()
    ckpt = tmp_path / "model.pt"
    torch.save({"model": source.state_dict()}, ckpt)  # the MONAI checkpoint-dict form
    net = transfer.prepare_network(KarimiFCN(), "finetune", str(ckpt))
    for (n, a), b in zip(source.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(p.requires_grad for p in net.parameters())
    assert transfer.learning_rate(1e-4, "finetune") == pytest.approx(5e-5)
    assert transfer.learning_rate(1e-4, "scratch") == pytest.approx(1e-4)
    assert transfer.learning_rate(1e-4, "frozen_random_encoder") == pytest.approx(1e-4)


def test_source_with_other_class_count_reinitialises_head(tmp_path, caplog):
    torch.manual_seed(4)
    source = KarimiFCN(out_channels=2)
    ckpt = tmp_path / "model.pt"
    torch.save(source.state_dict(), ckpt)
    net = KarimiFCN(out_channels=4)
    with caplog.at_level(logging.WARNING, logger="common.transfer"):
        reinit = transfer.load_source_weights(net, str(ckpt))
    assert reinit == ["head.bias", "head.weight"]
    assert "re-initialised" in caplog.text
    assert net.head.weight.shape == (4, 28, 3, 3, 3)
    assert torch.equal(net.encoder[0].image_path.conv.weight, source.encoder[0].image_path.conv.weight)


def test_source_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        transfer.prepare_network(KarimiFCN(), "finetune", str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save(KarimiFCN(features=8).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        transfer.prepare_network(KarimiFCN(), "finetune", str(other))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read"):
        transfer.prepare_network(KarimiFCN(), "finetune", str(bad))
    with pytest.raises(ValueError, match="Unknown transfer mode"):
        transfer.prepare_network(KarimiFCN(), "finetune_everything")


def test_decay_rule_on_the_training_loss():
    rule = DecayRule("loss")
    decisions = []
    for window in ([1.0, 0.8], [0.7, 0.7], [0.7, 0.7], [0.9, 0.5], [0.6, 0.6]):
        for v in window:
            rule.update(v)
        decisions.append(rule.window_end())
    # means: 0.9 (first: record only), 0.7 (decreased), 0.7 (not decreased), 0.7 (not), 0.6 (decreased)
    assert decisions == [False, False, True, True, False]


def test_decay_rule_on_validation_dice():
    rule = DecayRule("val_dice", tolerance=0.995)
    assert [rule.window_end(v) for v in (0.50, 0.60, 0.598, 0.594, 0.70)] == [False, False, False, True, False]
    # 0.598 >= 0.995*0.60=0.597 (no decay); 0.594 < 0.995*0.598=0.59501 (decay)


def test_plateau_decay_handler_fires_exactly_at_window_ends():
    losses = iter([1.0, 0.9, 0.8] + [0.85, 0.85, 0.85] + [0.5, 0.5, 0.5] + [0.6, 0.6, 0.6])
    engine = Engine(lambda e, b: {"loss": next(losses)})
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    handler = PlateauDecay(opt, interval=3, factor=0.9)
    handler.attach(engine)
    lrs = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    engine.run([0] * 12, max_epochs=1)
    # windows: mean 0.9 (record), 0.85 (decreased), 0.5 (decreased), 0.6 (not: decay at iteration 12)
    assert lrs[:11] == [1e-4] * 11
    assert lrs[11] == pytest.approx(0.9e-4)
    assert handler.decays == 1
    state = handler.state_dict()
    fresh = PlateauDecay(opt, interval=3)
    fresh.load_state_dict(state)
    assert fresh.rule.previous == pytest.approx(0.6) and fresh.decays == 1


def test_plateau_decay_argument_errors():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="evaluator"):
        PlateauDecay(opt, monitor="val_dice")
    with pytest.raises(ValueError, match="interval"):
        PlateauDecay(opt, interval=0)
