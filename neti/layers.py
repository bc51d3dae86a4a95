"""The UNet's cross-attention layers in forward order, with stable names (NeTI Sec. 3.1: the space axis).

SD 1.x/2.x have 16 cross-attention layers. Their LDM names (IN01 ... MID ... OUT11, as in the official code and
the paper's figures) are derived from the diffusers module paths. SDXL's 70 stack several transformer blocks in one
attention module: each is named by its LDM block and its place in the stack, `IN04.0`, `IN04.1`, ..., `MID.9`, ...,
`OUT05.1` (docs/sdxl.md "Layer names"). Other layouts keep the diffusers path as name.
`unet.attn_processors` lists the mid block last, so the order is rebuilt here: down blocks, mid block, up blocks.
The layer table: docs/method.md "Base model and layers".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_PATH = re.compile(
    r"^(?P<group>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn2$"
)
_GROUP_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
SD_LAYER_NAMES = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
                  "OUT08", "OUT09", "OUT10", "OUT11")  # SD 1.x/2.x's 16 layers in forward order, coarse in the middle


@dataclass(frozen=True)
class CrossAttentionLayer:
    index: int  # position in forward order, the l of M(t, l)
    name: str  # stable short name: IN01..OUT11 for SD 1.x/2.x
    path: str  # diffusers module path of the attention module (its processor key minus ".processor")


def _sort_key(path: str) -> tuple:
    match = _PATH.match(path)
    if match is None:
        return (3, path)
    return (
        _GROUP_ORDER[match["group"]], int(match["block"] or 0), int(match["attn"]), int(match["tb"]),
    )


def _ldm_name(path: str, layers_per_block: int, single_block: bool) -> str | None:
    """IN/MID/OUT by the LDM block index; with stacked transformer blocks (SDXL) '.k' for the k-th of the stack."""
    match = _PATH.match(path)
    if match is None:
        return None
    stack = "" if single_block else f".{match['tb']}"
    if match["group"] == "mid_block":
        return "MID" + stack
    block, attn = int(match["block"]), int(match["attn"])
    if match["group"] == "down_blocks":
        return f"IN{block * (layers_per_block + 1) + attn + 1:02d}{stack}"
    return f"OUT{block * (layers_per_block + 1) + attn:02d}{stack}"


def cross_attention_layers(unet: nn.Module) -> list[CrossAttentionLayer]:
    """All cross-attention modules of `unet` in forward order."""
    paths = [
        name for name, module in unet.named_modules()
        if name.endswith("attn2") and getattr(module, "is_cross_attention", False)
    ]
    if not paths:
        raise ValueError("this UNet has no cross-attention layers (modules named '*.attn2'); NeTI needs them")
    paths.sort(key=_sort_key)
    config = getattr(unet, "config", None)
    layers_per_block = getattr(config, "layers_per_block", None)
    single_block = all(_PATH.match(p) and _PATH.match(p)["tb"] == "0" for p in paths)
    names = [_ldm_name(p, layers_per_block, single_block) if isinstance(layers_per_block, int) else None
             for p in paths]
    if any(n is None for n in names) or len(set(names)) != len(names):
        names = paths
    return [CrossAttentionLayer(i, n, p) for i, (n, p) in enumerate(zip(names, paths))]


def layer_groups(layers: list[CrossAttentionLayer]) -> list[str]:
    """The names a user picks layers by: the layer names, or on SDXL the blocks (`IN07` for `IN07.0` ... `IN07.9`),
    in forward order."""
    return list(dict.fromkeys(layer.name.split(".")[0] for layer in layers))


def resolve_layer_names(layers: list[CrossAttentionLayer], names: list[str]) -> list[int]:
    """Indices of the layers called `names` (case-insensitive); a block name (`IN07`, `MID`) selects every layer of
    its stack on SDXL (`IN07.0` ... `IN07.9`); a clear error for an unknown name."""
    by_name = {layer.name.upper(): layer.index for layer in layers}
    indices = []
    for name in names:
        key = str(name).strip().upper()
        stack = [index for full, index in by_name.items() if full.split(".")[0] == key and "." in full]
        if key not in by_name and not stack:
            raise ValueError(f"unknown layer name {name!r}; this model's layers are: {', '.join(by_name)}")
        indices.extend([by_name[key]] if key in by_name else stack)
    return indices
