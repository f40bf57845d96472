# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Transfer modes: which parameters train, at which learning rate, from which checkpoint.

Modes (the paper's Sections II-B, III-F and Table VIII discussion):

==========================  ==============================================  =========================
mode                        what trains                                     initial learning rate
==========================  ==============================================  =========================
``scratch``                 everything, from He init (R.I.)                 ``base_lr``
``finetune``                everything, from the source checkpoint (T.L.)   ``base_lr / 2``
``finetune_last_k``         the last ``k`` conv layers (k=2), from source   ``base_lr / 2``
``finetune_encoder``        the encoder only, from source                   ``base_lr / 2``
``finetune_decoder``        the decoder and head only, from source          ``base_lr / 2``
``frozen_random_encoder``   the decoder and head; encoder frozen at its     ``base_lr``
                            random init and run without autograd
==========================  ==============================================  =========================

A source checkpoint may be a plain state dict (``models/model.pt`` of a bundle) or a MONAI/ignite
checkpoint dict holding it under ``"model"`` (or ``"network"``). When the source's output head has a
different class count from the target network, the head is re-initialised (He, truncated) and the
log says so. The networks' sections come from their section protocol (:mod:`common.networks`), so this
module knows no architecture. Normalisation layers of a frozen section are kept in eval mode (the network's
``frozen_norms``), so their running statistics stay those of the source (or of the random init).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch.nn as nn
from monai.networks.utils import copy_model_state

from .checkpoints import check_state_fits, checkpoint_state_dict
from .networks import he_truncated_normal_, unwrap

__all__ = [
    "MODES",
    "SOURCE_MODES",
    "learning_rate",
    "load_source_weights",
    "apply_transfer_mode",
    "prepare_network",
    "trainable_parameters",
    "encoder_parameters",
    "decoder_parameters",
]

logger = logging.getLogger(__name__)

MODES = (
    "scratch",
    "finetune",
    "finetune_last_k",
    "finetune_encoder",
    "finetune_decoder",
    "frozen_random_encoder",
)
#: Modes that start from a source (pre-trained) checkpoint.
SOURCE_MODES = ("finetune", "finetune_last_k", "finetune_encoder", "finetune_decoder")

def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown transfer mode {mode!r}; choose one of {', '.join(MODES)}.")


def learning_rate(base_lr: float, mode: str) -> float:
    """Initial learning rate of ``mode``: halved for every mode that fine-tunes a source model."""
    _check_mode(mode)
    return base_lr / 2.0 if mode in SOURCE_MODES else base_lr


def encoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters of the encoder section (the network's ``encoder_parameters()``)."""
    return list(unwrap(network).encoder_parameters())


def decoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters of the decoder section, the output head included (the network's ``decoder_parameters()``)."""
    return list(unwrap(network).decoder_parameters())


def _last_layer_parameters(network: nn.Module, k: int) -> list[nn.Parameter]:
    return [p for m in unwrap(network).last_layers(k) for p in m.parameters()]


def load_source_weights(network: nn.Module, checkpoint: str) -> list[str]:
    """Load a source checkpoint into ``network`` for fine-tuning.

    Every tensor must match by name and shape (:func:`common.checkpoints.check_state_fits`), except the output
    head (``head_names()``), which is re-initialised when the class count differs (logged). The copy is MONAI's
    ``copy_model_state``. Returns the list of re-initialised keys.

    Raises:
        FileNotFoundError: the checkpoint file does not exist.
        ValueError: the file cannot be read, or it belongs to another architecture.
    """
    source = checkpoint_state_dict(
        checkpoint,
        missing_hint="train the source model first (the bundle's pretrain config) or pass "
        "--source_checkpoint <path to model.pt>.",
        what="Source checkpoint",
    )
    net = unwrap(network)
    head = tuple(net.head_names())
    reinit = sorted(check_state_fits(source, net, f"Source checkpoint {checkpoint}", may_differ=head))
    copy_model_state(net, source, inplace=True)  # tensors of another shape (the head in ``reinit``) are skipped
    if reinit:
        for name in sorted({k.rsplit(".", 1)[0] for k in reinit}):
            module = net.get_submodule(name)
            he_truncated_normal_(module)
            if hasattr(module, "reset_parameters") and not isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                module.reset_parameters()  # e.g. a normalisation layer of the head
        logger.warning(
            "Source checkpoint %s has %s output classes, the network %s: the output head (%s) was re-initialised.",
            checkpoint, tuple(source[reinit[0]].shape)[:1], tuple(net.state_dict()[reinit[0]].shape)[:1],
            ", ".join(reinit),
        )  # fmt: skip
    logger.info("Loaded source weights from %s (%d tensors).", checkpoint, len(source) - len(reinit))
    return reinit


def apply_transfer_mode(network: nn.Module, mode: str, last_k: int = 2) -> nn.Module:
    """Set ``requires_grad`` on ``network``'s parameters for ``mode`` (weights are not touched).

    For ``frozen_random_encoder`` the network's ``encoder_frozen`` flag is also set, so its encoder
    runs under ``torch.no_grad()`` and the step needs no backward pass through it.
    """
    _check_mode(mode)
    if mode in ("scratch", "finetune"):
        train = list(network.parameters())
    elif mode == "finetune_last_k":
        train = _last_layer_parameters(network, last_k)
    elif mode == "finetune_encoder":
        train = encoder_parameters(network)
    else:  # finetune_decoder, frozen_random_encoder
        train = decoder_parameters(network)
    keep = {id(p) for p in train}
    for p in network.parameters():
        p.requires_grad_(id(p) in keep)
    net = unwrap(network)
    net.encoder_frozen = not any(p.requires_grad for p in encoder_parameters(net))
    if hasattr(net, "frozen_norms"):
        net.frozen_norms = [
            m for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None and not m.weight.requires_grad
        ]  # fmt: skip
        net.train(net.training)
    n_train = sum(p.numel() for p in network.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in network.parameters())
    logger.info("Transfer mode %s: %d of %d parameters train.", mode, n_train, n_all)
    return network


def prepare_network(
    network: nn.Module, mode: str = "scratch", source_checkpoint: str | None = None, last_k: int = 2
) -> nn.Module:
    """Load the source weights when ``mode`` needs them, then apply the mode. Returns ``network``."""
    _check_mode(mode)
    if mode in SOURCE_MODES:
        load_source_weights(network, source_checkpoint or "")
    elif source_checkpoint:
        logger.info("Transfer mode %s starts from random weights; source checkpoint %s is not used.", mode, source_checkpoint)
    return apply_transfer_mode(network, mode, last_k=last_k)


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update (``requires_grad`` set)."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: check the transfer mode.")
    return params


def frozen_parameters(network: nn.Module) -> Iterable[nn.Parameter]:
    """Parameters that the transfer mode froze."""
    return [p for p in network.parameters() if not p.requires_grad]
