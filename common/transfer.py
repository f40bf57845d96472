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
log says so.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch.nn as nn

from .checkpoints import checkpoint_state_dict
from .networks import he_truncated_normal_

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

# V-Net (monai.networks.nets.VNet) module prefixes of its two sections.
_VNET_ENCODER = ("in_tr.", "down_tr32.", "down_tr64.", "down_tr128.", "down_tr256.")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown transfer mode {mode!r}; choose one of {', '.join(MODES)}.")


def learning_rate(base_lr: float, mode: str) -> float:
    """Initial learning rate of ``mode``: halved for every mode that fine-tunes a source model."""
    _check_mode(mode)
    return base_lr / 2.0 if mode in SOURCE_MODES else base_lr


def encoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters of the encoder section (the paper's FCN or MONAI's V-Net)."""
    if hasattr(network, "encoder_parameters"):
        return list(network.encoder_parameters())
    return [p for n, p in network.named_parameters() if n.startswith(_VNET_ENCODER)]


def decoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters of the decoder section, the output head included."""
    if hasattr(network, "decoder_parameters"):
        return list(network.decoder_parameters())
    enc = {id(p) for p in encoder_parameters(network)}
    return [p for p in network.parameters() if id(p) not in enc]


def _last_layer_parameters(network: nn.Module, k: int) -> list[nn.Parameter]:
    if hasattr(network, "last_layers"):
        layers = network.last_layers(k)
    else:
        convs = [m for m in network.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
        layers = convs[-k:]
    return [p for m in layers for p in m.parameters()]


def _head_keys(network: nn.Module) -> tuple[str, ...]:
    if hasattr(network, "head_names"):
        return tuple(network.head_names())
    convs = [n for n, m in network.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    last = convs[-1]
    return (f"{last}.weight", f"{last}.bias")


def load_source_weights(network: nn.Module, checkpoint: str) -> list[str]:
    """Load a source checkpoint into ``network`` for fine-tuning.

    Every parameter must match by name and shape, except the output head, which is re-initialised
    when the class count differs (logged). Returns the list of re-initialised keys.

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
    target = network.state_dict()
    head = set(_head_keys(network))
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"Source checkpoint {checkpoint} does not fit this network ({type(network).__name__}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). Was it trained with another architecture?"
        )
    reinit: list[str] = []
    mismatched = [k for k in target if source[k].shape != target[k].shape]
    bad = [k for k in mismatched if k not in head]
    if bad:
        raise ValueError(
            f"Source checkpoint {checkpoint} does not fit this network: shape mismatch at {bad[:3]} "
            f"(source {tuple(source[bad[0]].shape)} vs network {tuple(target[bad[0]].shape)})."
        )
    state = {k: (target[k] if k in mismatched else source[k]) for k in target}
    network.load_state_dict(state)
    if mismatched:
        head_module = network.get_submodule(mismatched[0].rsplit(".", 1)[0])
        he_truncated_normal_(head_module)
        reinit = sorted(mismatched)
        logger.warning(
            "Source checkpoint %s has %s output classes, the network %s: the output head (%s) was re-initialised.",
            checkpoint,
            tuple(source[reinit[0]].shape)[:1],
            tuple(target[reinit[0]].shape)[:1],
            ", ".join(reinit),
        )
    logger.info("Loaded source weights from %s (%d tensors).", checkpoint, len(state))
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
    if hasattr(network, "encoder_frozen"):
        network.encoder_frozen = not any(p.requires_grad for p in encoder_parameters(network))
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
