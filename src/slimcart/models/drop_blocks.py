"""A shallower image network: some residual blocks of each stage removed, the rest kept as they are.

A stage is one ``nn.Sequential`` of blocks: timm's EfficientNet / MobileNet ``blocks.N`` and
torchvision ResNet's ``layerN``. The first block of a stage changes the width or the stride; the
others map their input to an output of the same shape through a residual connection, so removing one
leaves the identity in its place. The spec keeps, per stage, the indices of the blocks kept
(``kept_blocks``); a rebuilt model renumbers them 0..k-1 as the saved weights do. Networks trained
with stochastic depth (timm's ``drop_path_rate``) were trained to work with blocks skipped."""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import ModelError


def stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """The (name, stage) pairs of ``model``, in order; an error names what is supported."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and all(isinstance(s, nn.Sequential) for s in blocks):
        return [(f"blocks.{i}", s) for i, s in enumerate(blocks)]
    layers = [(f"layer{i}", getattr(model, f"layer{i}", None)) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for _, s in layers):
        return layers
    raise ModelError(f"{type(model).__name__} has no stages of blocks that slimcart can shorten.",
                     "Depth students work on timm EfficientNet / MobileNet (blocks.N) and torchvision "
                     "ResNet (layer1..layer4); give student.resolution or student.width instead.")


def removable(model: nn.Module, example: tuple[Tensor, ...]) -> dict[str, list[int]]:
    """Per stage, the blocks (index >= 1) whose output has their input's shape: those can go."""
    import torch

    shapes: dict[tuple[str, int], bool] = {}
    hooks = [blk.register_forward_hook(lambda _m, a, o, k=(name, i): shapes.__setitem__(
                 k, isinstance(o, Tensor) and a[0].shape == o.shape))
             for name, stage in stages(model) for i, blk in enumerate(stage)]
    try:
        with torch.no_grad():
            model.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    return {name: [i for i in range(1, len(stage)) if shapes.get((name, i))] for name, stage in stages(model)}


def apply_kept_blocks(model: nn.Module, kept: list[list[int]]) -> nn.Module:
    """Keep, in stage s, the blocks ``kept[s]`` (in order); the others are removed."""
    found = stages(model)
    if len(kept) != len(found):
        raise ModelError(f"kept_blocks lists {len(kept)} stages; the model has {len(found)}.")
    for (name, stage), idx in zip(found, kept):
        if not idx or idx[0] != 0 or sorted(set(idx)) != list(idx) or idx[-1] >= len(stage):
            raise ModelError(f"kept_blocks for {name} is {idx}: it must start with block 0 and name "
                             f"increasing blocks below {len(stage)}.")
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        new = nn.Sequential(*[stage[i] for i in idx])
        if isinstance(owner, nn.Sequential):
            owner[int(attr)] = new
        else:
            setattr(owner, attr, new)
    return model
