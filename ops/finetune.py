"""Fine-tuning controls as the optimizer's parameter groups: frozen stages, a learning-rate multiplier for the
stages that hold pretrained weights, and layer-wise decay of that multiplier towards the input.

    encoders.<m>.freeze      stage name or count (that stage and all before it), or a list of stage names
    encoders.<m>.lr_mult     multiplier of this encoder's pretrained stages (default optim.pretrained_lr_mult)
    optim.pretrained_lr_mult multiplier of every pretrained stage (1 = the same rate as the new parameters)
    optim.layer_decay        pretrained stage i of P gets layer_decay ** (P - i) on top (1 = off)
"""
from __future__ import annotations

from model.cotrain import CoTrainModel, ModalitySpec, StageLayout

from .config import OptimConfig

__all__ = ["frozen_stages", "stage_lr_mults", "param_groups"]


def frozen_stages(spec: ModalitySpec, layout: StageLayout) -> set[int]:
    """Indices of the stages `spec.freeze` names."""
    freeze, names = spec.freeze, layout.names
    where = f"encoders.{spec.name}.freeze={freeze!r}"
    if freeze is None or freeze == []:
        return set()
    if isinstance(freeze, bool) or not isinstance(freeze, (int, str, list)):
        raise ValueError(f"{where}: give a stage name, a stage count or a list of stage names")
    if isinstance(freeze, int):
        if not 0 <= freeze <= len(names):
            raise ValueError(f"{where}: a count of stages must be 0..{len(names)}")
        return set(range(freeze))
    unknown = [n for n in ([freeze] if isinstance(freeze, str) else freeze) if n not in names]
    if unknown:
        raise ValueError(f"{where}: {', '.join(map(str, unknown))} not among the encoder's stages; valid names: "
                         f"{', '.join(names)}")
    if isinstance(freeze, str):
        return set(range(names.index(freeze) + 1))
    return {names.index(n) for n in freeze}


def stage_lr_mults(spec: ModalitySpec, layout: StageLayout, optim: OptimConfig) -> dict[int, float]:
    """Learning-rate multiplier per pretrained stage (stages not listed train at the base rate)."""
    base = optim.pretrained_lr_mult if spec.lr_mult is None else float(spec.lr_mult)
    if base <= 0:
        raise ValueError(f"encoders.{spec.name}.lr_mult must be > 0 (freeze a stage to stop it), got {base}")
    return {i: base * optim.layer_decay ** (layout.pretrained - i) for i in range(layout.pretrained)}


def param_groups(model: CoTrainModel, specs: list[ModalitySpec], optim: OptimConfig) -> list[dict]:
    """The optimizer's parameter groups, one per learning rate; frozen parameters stop requiring gradients and
    join no group."""
    mult_of: dict[int, float | None] = {}  # None: frozen
    for spec in specs:
        layout = model.stage_layout[spec.name]
        frozen, mults = frozen_stages(spec, layout), stage_lr_mults(spec, layout, optim)
        for stage, _, param in model.encoder_parameters(spec.name):
            mult_of[id(param)] = None if stage in frozen else mults.get(stage, 1.0)
    by_mult: dict[float, list] = {}
    for param in model.parameters():  # the model's own order: without fine-tuning, one group as before
        mult = mult_of.get(id(param), 1.0)
        if mult is None:
            param.requires_grad_(False)
        else:
            by_mult.setdefault(mult, []).append(param)
    return [{"params": params, "lr": optim.lr * mult} for mult, params in sorted(by_mult.items())]
