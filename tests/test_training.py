# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Training pieces: the loss goes down, transfer modes train exactly the section they name (and freeze the rest),
the decay rule fires when it should.

The networks are the paper's FCN at ``features=4`` (the same topology, ~18x cheaper a step) on 16^3 blocks,
run with one torch thread (tiny tensors: more threads only spin on a shared machine)."""

from __future__ import annotations

import logging
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.losses import DiceLoss

from common import transfer
from common.handlers import DecayRule, PlateauDecay
from common.networks import KarimiFCN, VNet

F = 4  # features of the test networks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    net = KarimiFCN(features=F, dropout=0.0)
    # the paper's 1e-4 takes the full-width network there in 36 steps (0.87 -> 0.05); the 4-feature one needs 1e-3
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
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
    assert first > 0.8 and last < 0.3 * first, (first, last)  # seen: 0.84 -> 0.05


def _train_steps(net: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.Adam(transfer.trainable_parameters(net), lr=1e-3)
    data = _sphere_task(n=2)
    for s in range(steps):
        img, lab = data[s % 2]
        opt.zero_grad()
        _loss_fn()(net(img), lab).backward()
        opt.step()


def _section_of(name: str, mode: str, last_k: int = 2) -> bool:
    """Whether parameter ``name`` of the FCN trains in ``mode``, from the paper's definitions (not from the code's
    section protocol): the encoder is ``encoder.*``; the decoder is ``decoder.*`` and the output head ``head.*``;
    the last k convolutions in forward order are the head, then the residual convolutions of the last decoder
    level from the end."""
    if mode in ("scratch", "finetune"):
        return True
    if mode == "finetune_encoder":
        return name.startswith("encoder.")
    if mode in ("finetune_decoder", "frozen_random_encoder"):
        return name.startswith(("decoder.", "head."))
    last = ["head", "decoder.2.residual.block2.1.conv", "decoder.2.residual.block2.0.conv",
            "decoder.2.residual.block1.1.conv"][:last_k]
    return name.rsplit(".", 1)[0] in last


@pytest.mark.parametrize(
    "mode, last_k",
    [("frozen_random_encoder", 2), ("finetune_last_k", 2), ("finetune_last_k", 3), ("finetune_encoder", 2),
     ("finetune_decoder", 2)],
)  # fmt: skip
def test_the_named_section_trains_and_the_rest_stays_bit_identical(mode, last_k, tmp_path):
    """A few Adam steps: every parameter of the section the mode names changed, every other one is bit-identical
    and got no gradient (finetune_encoder: the encoder changed, the decoder and head did not; finetune_decoder /
    frozen_random_encoder: the reverse; finetune_last_k: only the last k convolutions)."""
    torch.manual_seed(1)
    src = tmp_path / "source.pt"
    torch.save(KarimiFCN(features=F).state_dict(), src)
    torch.manual_seed(2)
    net = transfer.prepare_network(
        KarimiFCN(features=F, dropout=0.0), mode, str(src) if mode in transfer.SOURCE_MODES else None, last_k=last_k
    )
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    expected = {n for n in before if _section_of(n, mode, last_k)}
    assert 0 < len(expected) < len(before)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    _train_steps(net, steps=3)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])
    for n, p in net.named_parameters():
        if n not in expected:
            assert p.grad is None, f"{n} received a gradient"
    assert net.encoder_frozen == (mode != "finetune_encoder")


def test_frozen_encoder_builds_no_graph_through_the_encoder():
    net = transfer.prepare_network(KarimiFCN(features=F), "frozen_random_encoder")
    feats = []
    h = net.encoder[3].register_forward_hook(lambda m, i, o: feats.append(o))
    net(torch.randn(1, 1, 16, 16, 16))
    h.remove()
    assert feats[0].grad_fn is None and not feats[0].requires_grad


def test_finetune_loads_source_and_halves_lr(tmp_path):
    torch.manual_seed(3)
    source = KarimiFCN(features=F)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": source.state_dict()}, ckpt)  # the MONAI checkpoint-dict form
    net = transfer.prepare_network(KarimiFCN(features=F), "finetune", str(ckpt))
    for (n, a), b in zip(source.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(p.requires_grad for p in net.parameters())
    assert transfer.learning_rate(1e-4, "finetune") == pytest.approx(5e-5)
    assert transfer.learning_rate(1e-4, "scratch") == pytest.approx(1e-4)
    assert transfer.learning_rate(1e-4, "frozen_random_encoder") == pytest.approx(1e-4)


def test_source_with_other_class_count_reinitialises_head(tmp_path, caplog):
    torch.manual_seed(4)
    source = KarimiFCN(features=F, out_channels=2)
    ckpt = tmp_path / "model.pt"
    torch.save(source.state_dict(), ckpt)
    net = KarimiFCN(features=F, out_channels=4)
    with caplog.at_level(logging.WARNING, logger="common.transfer"):
        reinit = transfer.load_source_weights(net, str(ckpt))
    assert reinit == ["head.bias", "head.weight"]
    assert "re-initialised" in caplog.text
    assert net.head.weight.shape == (4, 2 * F, 3, 3, 3)
    src = source.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, src[k]), k


def test_vnet_source_with_other_class_count_reinitialises_out_tr_only(tmp_path, caplog):
    """Fine-tuning a 2-class V-Net source into a 3-class V-Net: every tensor outside the head ``out_tr`` is the
    source's; the head's convolutions are drawn afresh (He, truncated: std 0.88 sqrt(2 / fan_in)) and its
    BatchNorm reset (weight 1, bias 0, running mean 0, running variance 1)."""
    torch.manual_seed(5)
    source = VNet(out_channels=2)
    with torch.no_grad():  # source statistics that a reset would visibly undo
        for m in source.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
                m.weight.fill_(1.5)
    ckpt = tmp_path / "vnet.pt"
    torch.save(source.state_dict(), ckpt)
    src = source.state_dict()
    net = VNet(out_channels=3)
    with caplog.at_level(logging.WARNING, logger="common.transfer"):
        reinit = transfer.load_source_weights(net, str(ckpt))
    assert reinit and all(k.startswith("out_tr.") for k in reinit)
    assert "re-initialised" in caplog.text
    state = net.state_dict()
    for k, v in state.items():
        if not k.startswith("out_tr."):
            assert torch.equal(v, src[k]), k
    w = state["out_tr.conv_block.conv.weight"].double()  # (3, 32, 5, 5, 5): 12000 draws
    sigma = math.sqrt(2.0 / (32 * 125))
    trunc = 0.8796  # std of a normal cut at +-2 std, relative to sigma
    assert w.shape == (3, 32, 5, 5, 5) and w.abs().max() <= 2 * sigma * (1 + 1e-6)
    assert abs(w.std().item() - trunc * sigma) < 5 * trunc * sigma / math.sqrt(2 * w.numel())
    bn = net.get_submodule("out_tr.conv_block.adn.N")
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_source_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        transfer.prepare_network(KarimiFCN(features=F), "finetune", str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save(KarimiFCN(features=8).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        transfer.prepare_network(KarimiFCN(features=F), "finetune", str(other))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read"):
        transfer.prepare_network(KarimiFCN(features=F), "finetune", str(bad))
    with pytest.raises(ValueError, match="Unknown transfer mode"):
        transfer.prepare_network(KarimiFCN(features=F), "finetune_everything")


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


# ---------------------------------------------------------------------------------------------- decay in a bundle run
class ScheduledInferer:
    """Stands in for the validation's sliding window: logits that make every voxel foreground (``True``) or
    background (``False``), validation after validation, so the validation DSC of each epoch is known in advance
    (all-foreground: 2|R| / (|R| + N) > 0; all-background: 0), whatever the network learnt."""

    def __init__(self, schedule) -> None:
        self.schedule = list(schedule)
        self.calls = 0

    def __call__(self, inputs, network, *args, **kwargs):
        fg = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        return torch.cat([torch.zeros_like(inputs), torch.full_like(inputs, 10.0 if fg else -10.0)], dim=1)


def test_val_dice_decay_in_a_bundle_run_reads_the_current_validation(tmp_path, caplog):
    """``train.json`` with ``lr_decay_monitor val_dice`` and a decay window of one epoch (2 iterations): the decision
    at the end of window k compares the validation DSC of epoch k (the window just trained) with that of epoch
    k - 1. Validation DSCs by construction: d, d, 0, d, d (d > 0), so the learning rate halves once, at the end of
    window 3 (iteration 6), where the DSC fell; not at window 4 (the DSC rose), which a decision that read the
    previous window's DSC would pick."""
    import json

    from monai.bundle import ConfigWorkflow

    from common.synthetic import make_scenario

    data = make_scenario("liver_ct", str(tmp_path / "ds"), 4, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    schedule = [True, True, False, True, True]
    inferer = ScheduledInferer(schedule)
    cfg = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs", "train.json")
    wf = ConfigWorkflow(
        config_file=cfg, workflow_type="train", logging_file=False, bundle_root=str(tmp_path), dataset_dir=data,
        n_val=1, iterations_per_epoch=2, max_epochs=len(schedule), lr_decay_monitor="val_dice", lr_decay_interval=2,
        lr_warmup_iterations=0,
        lr_decay_factor=0.5, base_lr=1e-4, block_size=[16, 16, 16], **{"network_def#features": F,
        "validate#inferer": inferer, "device": "$torch.device('cpu')"},
    )  # fmt: skip
    wf.initialize()
    with caplog.at_level(logging.INFO, logger="common.handlers"):
        wf.run()
    wf.finalize()
    assert inferer.calls == len(schedule)  # one validation case, validated every epoch
    run = tmp_path / "runs" / "train"
    dsc = {e["epoch"]: e["val_dice"] for e in json.loads((run / "snapshots" / "history.json").read_text(encoding="utf-8"))["entries"]}
    d = [dsc[k] for k in range(1, len(schedule) + 1)]
    assert d[0] > 0 and d[2] == 0.0 and d[0] == d[1] == d[3] == d[4], d
    # the rule, from the validation DSCs: decay at the end of window k >= 2 when DSC(k) < 0.995 DSC(k - 1)
    expected = [2 * k for k in range(2, len(d) + 1) if d[k - 1] < 0.995 * d[k - 2]]
    assert expected == [6]
    decays = [int(m) for m in re.findall(r"Iteration (\d+): monitored val_dice did not improve", caplog.text)]
    assert decays == expected, caplog.text[-2000:]
    final = torch.load(run / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.5 ** len(expected), rel=1e-12)
    assert final["lr_decay"]["decays"] == len(expected)


def test_the_warmup_raises_the_learning_rate_linearly_and_resumes_where_it_stopped(tmp_path):
    """``lr_warmup_iterations`` W: iteration t + 1 (t steps done) trains at ``lr * (1/W + (1 - 1/W) min(t, W) / W)``,
    from ``lr / W`` to ``lr`` (torch's ``LinearLR`` stepped per iteration by MONAI's ``LrScheduleHandler``); a run
    stopped inside the warm-up and started again continues the same sequence (the scheduler is checkpointed)."""
    from monai.bundle import ConfigWorkflow

    from common.synthetic import make_scenario

    data = make_scenario("liver_ct", str(tmp_path / "ds"), 4, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    cfg = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs", "train.json")
    w, lr = 4, 1e-4

    def run(max_epochs: int) -> list[float]:
        wf = ConfigWorkflow(
            config_file=cfg, workflow_type="train", logging_file=False, bundle_root=str(tmp_path), dataset_dir=data,
            n_val=1, iterations_per_epoch=3, max_epochs=max_epochs, base_lr=lr, lr_warmup_iterations=w,
            block_size=[16, 16, 16], save_snapshots=False, **{"network_def#features": F, "device": "$torch.device('cpu')"},
        )  # fmt: skip
        wf.initialize()
        opt = wf.parser.get_parsed_content("optimizer")
        seen: list[float] = []
        wf.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.ITERATION_STARTED, lambda e: seen.append(opt.param_groups[0]["lr"])
        )
        wf.run()
        wf.finalize()
        return seen

    expected = [lr * (1 / w + (1 - 1 / w) * min(t, w) / w) for t in range(6)]
    first = run(1)
    assert first == pytest.approx(expected[:3], rel=1e-9)
    assert run(2) == pytest.approx(expected[3:], rel=1e-9)  # resumed at iteration 3, inside the warm-up
    assert expected[-1] == lr and expected[0] == lr / w
