"""Vision Transformer (Dosovitskiy et al., 2021) with timm's parameter names and shapes.

Why our own module and not ``timm`` at run time: the product depends only on
torch/torchvision, the pretraining head (tanh pre-logits layer) is gone from
timm's ``VisionTransformer``, and attention weights for visualisation need an
explicit path next to the fused one. Why timm's names anyway: exported weights
must load into ``timm.models.vision_transformer.VisionTransformer`` and timm
weights into this model with ``load_state_dict(strict=True)``.

What is matched against timm 1.0.31 (``tests/test_model.py`` checks it both ways):

* keys ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + N, D) with an entry for the
  class token, ``patch_embed.proj`` (conv, kernel = stride = patch),
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``; LayerNorm
  eps 1e-6, exact (erf) GELU, qkv with bias, attention scale ``head_dim ** -0.5``.
* ``pool='token'``: final ``norm`` on all tokens, class token pooled; timm
  ``global_pool='token'``.
* ``pool='gap'``: timm ``global_pool='avg'`` with its default ``fc_norm``: no
  ``norm`` on the tokens; the patch tokens (class token excluded) are averaged,
  then ``fc_norm`` normalises the mean. The key is ``fc_norm``, not ``norm``.
  (big_vision normalises before averaging; its weights map onto ``fc_norm`` only
  approximately, so we follow timm for exact round trips.)
* Pre-logits head: ``pre_logits = Sequential(fc=Linear(D, P), act=Tanh)``, the
  layout of timm <= 0.5 ``representation_size`` and of timm's
  ``NormMlpClassifierHead``. timm 1.0's ``VisionTransformer`` has no such layer
  (its checkpoint filter drops ``pre_logits.*``), so models with it move to timm
  after ``reset_classifier`` (finetuning) or with the pre-logits layer as timm's
  ``head``.

Initialisation is timm's ``'jax'`` mode (close to big_vision's): Linear
xavier-uniform with zero bias (MLP biases normal(1e-6)), patch conv LeCun-normal,
``pos_embed`` trunc-normal(0.02) (cut at +-2 absolute, as timm: in effect a
normal), ``cls_token`` normal(1e-6), classifier head zero weights and bias
``head_bias`` (-10 with big_vision's sigmoid loss, so initial probabilities are
tiny over 21k classes).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

Pool = Literal["token", "gap"]

VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
}
"""Variant name -> (width, depth, heads, MLP dim), as in the ViT paper and big_vision ``vit.py``."""

CUSTOM = "custom"
LN_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """The complete architecture of a model: enough to rebuild it without the training config.

    Stored as JSON next to exported weights (``to_dict``) and rebuilt with
    ``build_vit_from_config``; invalid combinations fail here, at construction.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: int = 224
    num_classes: int = 1000
    """0 builds no classifier (``head`` is the identity), as in timm."""
    pre_logits: Optional[int] = None
    """Width of the tanh pre-logits layer before the classifier (pretraining head); None: linear head."""
    pool: Pool = "token"
    in_chans: int = 3
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block, linearly increasing from 0 in the first."""
    head_bias: float = 0.0
    """Initial classifier bias (only affects initialisation)."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "img_size", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                f"pick a head count that divides the width (e.g. {self.embed_dim // 64 or 1} heads of 64)"
            )
        if self.img_size % self.patch_size:
            lower = self.img_size // self.patch_size * self.patch_size or self.patch_size
            raise ValueError(
                f"ViTConfig: img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"use a multiple of {self.patch_size} (e.g. {lower} or {lower + self.patch_size})"
            )
        if self.pool not in ("token", "gap"):
            raise ValueError(f"ViTConfig.pool={self.pool!r} is not one of ['token', 'gap']")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0 (0: no classifier), got {self.num_classes}")
        if self.pre_logits is not None and self.pre_logits <= 0:
            raise ValueError(f"ViTConfig.pre_logits must be a positive width or None, got {self.pre_logits}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"ViTConfig.drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ViTConfig":
        """Strict inverse of ``to_dict``: unknown keys are errors, with the nearest valid key."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
                raise ValueError(f"ViTConfig: unknown key {key!r}; {hint}")
        return cls(**data)

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments for ``timm.models.vision_transformer.VisionTransformer`` building the same network.

        timm has no pre-logits layer, so a config with one has no timm twin.
        """
        if self.pre_logits is not None:
            raise ValueError("timm's VisionTransformer has no pre-logits layer; reset_classifier() the model first")
        return dict(
            img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
            num_classes=self.num_classes, global_pool="avg" if self.pool == "gap" else "token",
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_dim / self.embed_dim, drop_path_rate=self.drop_path,
        )


def parse_variant(variant: str) -> tuple[int, int, int, int, Optional[int]]:
    """``"B/16"`` -> (width, depth, heads, MLP dim, patch); ``"custom"`` -> zeros and no patch.

    Any patch size is accepted after a known name (``"B/8"``, ``"L/14"``).
    """
    if variant == CUSTOM:
        return 0, 0, 0, 0, None
    name, sep, patch = variant.partition("/")
    if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) <= 0:
        valid = ", ".join(f"{n}/PATCH" for n in VARIANTS)
        raise ValueError(
            f"unknown ViT variant {variant!r}: valid are {valid} with any patch size (e.g. 'B/16'), "
            f"or {CUSTOM!r} with embed_dim, depth, num_heads and patch_size given"
        )
    return (*VARIANTS[name], int(patch))


def vit_config(variant: str, *, img_size: int = 224, num_classes: int = 1000, pre_logits: Optional[int] = None,
               pool: Pool = "token", drop_path: float = 0.0, head_bias: float = 0.0, in_chans: int = 3,
               embed_dim: Optional[int] = None, depth: Optional[int] = None, num_heads: Optional[int] = None,
               mlp_dim: Optional[int] = None, patch_size: Optional[int] = None) -> ViTConfig:
    """Decode ``variant`` from the table and apply the size overrides (``custom`` needs them).

    ``mlp_dim`` defaults to 4x the width when the width is overridden.
    """
    width, layers, heads, mlp, patch = parse_variant(variant)
    sizes = dict(embed_dim=embed_dim or width, depth=depth or layers, num_heads=num_heads or heads,
                 patch_size=patch_size or patch)
    missing = [key for key, value in sizes.items() if not value]
    if missing:
        raise ValueError(f"variant {CUSTOM!r} needs {', '.join(missing)} (e.g. build_vit('custom', "
                         "embed_dim=64, depth=2, num_heads=2, patch_size=8))")
    if mlp_dim is None:
        mlp_dim = mlp if embed_dim is None and mlp else 4 * sizes["embed_dim"]
    return ViTConfig(**sizes, mlp_dim=mlp_dim, img_size=img_size, num_classes=num_classes, pre_logits=pre_logits,
                     pool=pool, in_chans=in_chans, drop_path=drop_path, head_bias=head_bias)


# ------------------------------------------------------------------ modules


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input images are {tuple(x.shape[-2:])}, but the model was built for {self.img_size}: "
                "resize the input, or build the model at that size and resample pos_embed (resample_pos_embed)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: fused SDPA normally, explicit softmax when weights are wanted."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and softmax weights ``(B, heads, N, N)``; the softmax runs in fp32 for bf16 inputs."""
        q, k, v = self._split(x)
        weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        return self._merge(weights @ v), weights


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with per-sample stochastic depth on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path2 = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attn.forward_with_weights(self.norm1(x))
        x = x + self.drop_path1(out)
        return x + self.drop_path2(self.mlp(self.norm2(x))), weights


class VisionTransformer(nn.Module):
    """ViT classifier; see the module docstring for what matches timm."""

    num_prefix_tokens = 1

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.img_size = config.img_size
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.embed_dim = dim
        self.num_classes = config.num_classes
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim))
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*(Block(dim, config.num_heads, config.mlp_dim, rate) for rate in rates))
        use_fc_norm = config.pool == "gap"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS) if use_fc_norm else nn.Identity()
        if config.pre_logits is not None:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(dim, config.pre_logits), act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        head_in = config.pre_logits or dim
        self.head = nn.Linear(head_in, config.num_classes) if config.num_classes else nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm ``'jax'`` initialisation (see module docstring)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name != "head":
                nn.init.xavier_uniform_(module.weight)
                if name.endswith(("mlp.fc1", "mlp.fc2")):
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.config.head_bias)

    # ------------------------------------------------------------- forward

    def forward_features(self, x: torch.Tensor, return_attention: bool = False
                         ) -> Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Tokens ``(B, 1 + N, D)`` after the final ``norm`` (identity with ``pool='gap'``).

        ``return_attention=True`` also returns each block's softmax attention
        ``(B, heads, 1 + N, 1 + N)``, computed explicitly (slower; no checkpointing).
        """
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if return_attention:
            attentions = []
            for block in self.blocks:
                x, weights = block.forward_with_weights(x)
                attentions.append(weights)
            return self.norm(x), attentions
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalise (``fc_norm``), then pre-logits layer and classifier unless ``pre_logits``.

        ``pre_logits=True`` gives the pooled features before any head layer, the
        same for the pretraining and the finetuning model.
        """
        if self.config.pool == "gap":
            pooled = feats[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = feats[:, 0]
        pooled = self.fc_norm(pooled)
        if pre_logits:
            return pooled
        return self.head(self.pre_logits(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -------------------------------------------------------------- helpers

    def no_weight_decay(self) -> set[str]:
        """Parameters that never get weight decay beyond the ndim <= 1 rule (norms, biases)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``): activations of one block at a time."""
        self.grad_checkpointing = enable


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated normal with variance 1 / fan_in, truncated at 2 std (JAX ``lecun_normal``).

    The std is divided by the std of a unit normal truncated at +-2, as JAX does,
    so the truncated samples end up with variance 1 / fan_in.
    """
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


# ---------------------------------------------------------------- builders


def build_vit(variant: str, *, img_size: int = 224, num_classes: int = 1000, pre_logits: Optional[int] = None,
              pool: Pool = "token", drop_path: float = 0.0, **overrides: Any) -> VisionTransformer:
    """A ViT from the variant table (``"B/16"``) or ``"custom"``.

    ``overrides``: ``embed_dim``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size``,
    ``head_bias``, ``in_chans`` (see ``vit_config``).
    """
    return VisionTransformer(vit_config(variant, img_size=img_size, num_classes=num_classes,
                                        pre_logits=pre_logits, pool=pool, drop_path=drop_path, **overrides))


def build_vit_from_config(config: Union[ViTConfig, Mapping[str, Any]]) -> VisionTransformer:
    """Rebuild a model from ``model.config`` or its ``to_dict()`` (e.g. an export's JSON)."""
    return VisionTransformer(config if isinstance(config, ViTConfig) else ViTConfig.from_dict(config))


def reset_classifier(model: VisionTransformer, num_classes: int) -> None:
    """Swap the pretraining head for a zero-initialised linear classifier (finetuning).

    Drops the pre-logits layer; zero weights and bias make the first finetuning
    logits uniform, as in the ViT paper. ``model.config`` follows the change.
    """
    if num_classes < 0:
        raise ValueError(f"reset_classifier: num_classes must be >= 0 (0: no classifier), got {num_classes}")
    ref = model.cls_token
    model.pre_logits = nn.Identity()
    if num_classes:
        model.head = nn.Linear(model.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
        model.head.train(model.training)
    else:
        model.head = nn.Identity()
    model.num_classes = num_classes
    model.config = dataclasses.replace(model.config, num_classes=num_classes, pre_logits=None, head_bias=0.0)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Union[int, tuple[int, int]], num_prefix_tokens: int = 1,
                       old_grid: Optional[tuple[int, int]] = None, mode: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """Interpolate the patch part of ``pos_embed`` (1, prefix + h*w, D) to ``new_grid``; prefix kept.

    Matches ``timm.layers.resample_abs_pos_embed`` (same defaults: bicubic,
    ``antialias=True``, which only matters when shrinking). ``old_grid`` None
    means square. The same grid returns the input unchanged.
    """
    new_hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_patches, 0))
        if side * side != num_patches:
            raise ValueError(f"resample_pos_embed: {num_patches} patch positions are not a square grid; "
                             "pass old_grid=(h, w)")
        old_grid = (side, side)
    old_hw = tuple(old_grid)
    if old_hw[0] * old_hw[1] != num_patches:
        raise ValueError(f"resample_pos_embed: old_grid={old_hw} holds {old_hw[0] * old_hw[1]} positions, but "
                         f"pos_embed has {num_patches} after {num_prefix_tokens} prefix tokens")
    if old_hw == new_hw:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.float().reshape(1, *old_hw, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_hw, mode=mode, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
