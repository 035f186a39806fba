"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021).

Image -> patch embedding (or a ResNet stem with patch size 1) -> [class token] + position embeddings -> pre-LN
transformer blocks -> final LayerNorm -> pool (class token or mean of all tokens) -> optional representation layer
(dense + tanh, the "pre-logits") -> classifier.

Parameter names follow timm's `VisionTransformer`, so a state dict moves between the two without renaming (apart
from the representation layer, which timm no longer has).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.init import Dense, PatchConv
from pretrain.model.pos_embed import resize_pos_embed, sincos_2d
from pretrain.model.resnet import ResNetStem
from pretrain.model.variants import stem_stride

Pool = Literal["token", "gap"]
PosEmbed = Literal["learned", "sincos"]

LAYER_NORM_EPS = 1e-6


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixel values to the [-1, 1] input range of the paper's preprocessing, in fp32."""
    return images.float() / 127.5 - 1.0


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, each mapped linearly to the model width (a stride-P convolution)."""

    def __init__(self, patch_size: int, in_chans: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = PatchConv(in_chans, width, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H/P, W/P)


class HybridEmbed(nn.Module):
    """ResNet feature map, each pixel a "patch" (patch size 1), projected to the model width."""

    def __init__(self, stem_stages: tuple[int, ...], in_chans: int, width: int):
        super().__init__()
        self.backbone = ResNetStem(stem_stages, in_chans)
        self.proj = PatchConv(self.backbone.out_channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))  # (B, D, H/16, W/16)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, width: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = Dense(width, 3 * width, fused=3)
        self.proj = Dense(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        dropout = self.attention_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Dense(mlp_dim) - GELU - dropout - Dense(width) - dropout."""

    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.fc1 = Dense(width, mlp_dim, bias_std=1e-6)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = Dense(mlp_dim, width, bias_std=1e-6)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability `rate`."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, width: int, mlp_dim: int, num_heads: int, dropout: float, attention_dropout: float, drop_path: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, num_heads, attention_dropout, dropout)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, mlp_dim, dropout)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PreLogits(nn.Module):
    """The representation layer of the pre-training head: dense + tanh."""

    def __init__(self, width: int, representation_size: int):
        super().__init__()
        self.fc = Dense(width, representation_size, kernel="lecun")  # flax's default, as in the JAX pre-logits
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        width: int,
        depth: int,
        mlp_dim: int,
        num_heads: int,
        patch_size: int,
        image_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        pool: Pool = "token",
        pos_embed: PosEmbed = "learned",
        representation_size: int | None = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
        head_bias_init: float = 0.0,
        stem_stages: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide image size {image_size}")
        if stem_stages is not None and patch_size != stem_stride(stem_stages):
            raise ValueError(f"a hybrid with stem stages {stem_stages} has patch size {stem_stride(stem_stages)}")
        self.width = width
        self.patch_size = patch_size
        self.pool = pool
        self.num_classes = num_classes
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_prefix_tokens = 1 if pool == "token" else 0
        self.grad_checkpointing = False
        self.checkpoint_every = 1
        self.learned_pos_embed = pos_embed == "learned"

        if stem_stages is None:
            self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        else:
            self.patch_embed = HybridEmbed(stem_stages, in_chans, width)
        # The JAX model has no class token when it pools by averaging.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "token" else None
        num_positions = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        if self.learned_pos_embed:
            self.pos_embed = nn.Parameter(torch.empty(1, num_positions, width))
            nn.init.normal_(self.pos_embed, std=0.02)
        else:
            table = torch.cat([torch.zeros(self.num_prefix_tokens, width), sincos_2d(self.grid_size, width)])
            # A buffer, not a parameter: fixed embeddings are neither trained nor decayed; not saved either, since
            # they are recomputed from the grid.
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        self.pos_drop = nn.Dropout(dropout)
        # Stochastic depth grows linearly with depth (plain floats: the model may be built on the meta device).
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[Block(width, mlp_dim, num_heads, dropout, attention_dropout, rate) for rate in rates]
        )
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.pre_logits = PreLogits(width, representation_size) if representation_size else nn.Identity()
        head_in = representation_size or width
        # Zero-initialised classifier; a negative bias (-10) keeps a sigmoid head over many classes sane at step 0.
        if num_classes > 0:
            self.head = Dense(head_in, num_classes, kernel="zeros", bias_value=head_bias_init)
        else:
            self.head = nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: everything but weight matrices and conv kernels."""
        # under ZeRO-3 a parameter is a flat partition; its real shape is ds_shape
        return {
            name
            for name, p in self.named_parameters()
            if len(getattr(p, "ds_shape", p.shape)) <= 1 or name in ("cls_token", "pos_embed")
        }

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute the activations of every `every`-th block (blocks 0, every, 2 * every, ...) in the backward pass
        instead of storing them; the others store theirs."""
        self.grad_checkpointing = enable
        self.checkpoint_every = every

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, prefix + rows * cols, D) table for a patch grid, resized when it differs from the trained one."""
        if grid == self.grid_size:
            return self.pos_embed
        if self.learned_pos_embed:
            return resize_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)
        table = sincos_2d(grid, self.width).to(self.pos_embed)
        return torch.cat([self.pos_embed[:, : self.num_prefix_tokens], table.unsqueeze(0)], dim=1)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, C, H, W) -> patch embeddings (B, N, D) and their (rows, cols) grid.

        Masked patch prediction corrupts these before `add_positions`, as the paper does.
        """
        patches = self.patch_embed(images)  # (B, D, rows, cols)
        return patches.flatten(2).transpose(1, 2), (patches.shape[-2], patches.shape[-1])

    def add_positions(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Prepend the class token and add position embeddings: (B, N, D) -> (B, prefix + N, D)."""
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        # DeepSpeed's bf16/fp16 engines cast parameters but not buffers: a fixed sin-cos table stays fp32
        return self.pos_drop(x + self.position_embeddings(grid).to(x.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer blocks and the final LayerNorm over all tokens."""
        for index, block in enumerate(self.blocks):
            recompute = self.grad_checkpointing and index % self.checkpoint_every == 0
            if recompute and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens (B, prefix + N, D)."""
        patches, grid = self.embed(images)
        return self.encode(self.add_positions(patches, grid))

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool == "token" else tokens.mean(dim=1)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, representation layer, classifier; `pre_logits=True` stops before the classifier."""
        x = self.pre_logits(self.pool_tokens(tokens))
        return x if pre_logits else self.head(x)

    def patch_representation(self, images: torch.Tensor) -> torch.Tensor:
        """The mean of the patch tokens' outputs, whatever `pool` says: the image representation of an encoder
        trained by a per-patch objective (masked patch prediction), which trains neither the class token's output
        nor the representation layer. With `pool: gap` and no representation layer it equals the pre-logits."""
        return self.forward_features(images)[:, self.num_prefix_tokens :].mean(dim=1)

    def forward(self, images: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits, or with `pre_logits=True` the image representation (for probes; through DeepSpeed's engine)."""
        return self.forward_head(self.forward_features(images), pre_logits=pre_logits)
