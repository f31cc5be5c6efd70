"""sfumato's diffusion transformer: one module for unconditional, class and text conditioning.

The 2024-25 text-to-image transformer in one readable file (Peebles & Xie 2023's DiT, with what
PixArt-alpha, SD3, Flux and Lumina changed):

- patches by a strided convolution, any grid of them (2D rotary positions, Su et al. 2021, split
  half for rows, half for columns: no position table, so every resolution of a curriculum and
  every aspect bucket runs through the same weights);
- adaLN-zero modulation by the timestep plus the condition (a class embedding; for text, the
  mean of the caption's token states, projected, as SD3's pooled vector);
- QK-norm (RMSNorm on queries and keys per head, SD3 and Flux), SwiGLU feed-forward, PyTorch's
  `scaled_dot_product_attention` (flash / memory-efficient kernels where the device has them);
- text either by cross-attention (`text_attention="cross"`: PixArt, Sana) or by joint attention
  over caption and image tokens, each stream with its own weights (`"joint"`: SD3's MMDiT);
- two training-only levers that cut a step's cost, drawing which tokens from `token_generator`
  (the training's seeded generator, so a resumed run draws the same): token routing (TREAD,
  Krause et al. 2025; `set_routing(ratio, start, end)`: a random share of the image tokens skips
  blocks start..end-1 and rejoins unchanged) and patch masking (MaskDiT, Zheng et al. 2024, as
  micro_diffusion trains it: `set_masking(ratio, mixer_blocks)`: after the first mixer_blocks
  blocks a random share of the tokens is dropped for good, and `loss_mask` tells the loss which
  pixels were predicted). In eval mode every token takes every block: inference is the plain
  model's;
- for representation alignment (REPA, Yu et al. 2025; `set_repa(depth)`, training only), the
  tokens after the first `depth` blocks and which image positions they are (`repa_tokens`), for
  the loss to align with a frozen image encoder's features (sfumato.models.repa).

Signature as diffusers' UNets (`forward(sample, timestep, class_labels=, encoder_hidden_states=)
.sample`, config keys `num_class_embeds`, `cross_attention_dim`, `sample_size`), so the pipeline,
the loss and the samplers call it as they call a UNet. This file imports only torch and
diffusers: `sfumato export` copies it into the export's unet/ folder, and
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it without sfumato.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def swiglu_width(hidden_size: int, mlp_ratio: float) -> int:
    """The SwiGLU's inner width: 2/3 of a GELU MLP's (same parameters), rounded up to 32."""
    return 32 * math.ceil(2 * mlp_ratio * hidden_size / 3 / 32)


def rope_angles(rows: int, columns: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2D rotary angles of a rows x columns grid, (1, 1, tokens, head_dim / 2):
    the first half of each head's rotated pairs turns with the row, the second with the column."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    y, x = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32),
        torch.arange(columns, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles = torch.cat([y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs], dim=1)
    return angles.cos()[None, None], angles.sin()[None, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, tokens, head_dim) rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * inner)
        self.w3 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Heads(nn.Module):
    """Query, key and value projections of one stream, split into heads, queries and keys
    RMS-normalised per head (QK-norm)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, query: bool = True, kv: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim) if query else None
        self.to_kv = nn.Linear(kv_dim or dim, 2 * dim) if kv else None
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if query else None
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if kv else None

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.split(self.to_q(x)))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return self.norm_k(self.split(k)), self.split(v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Block(nn.Module):
    """One transformer block over the image tokens `x` (and, joint, the caption tokens `text`),
    modulated by the conditioning vector `c`."""

    def __init__(self, dim: int, heads: int, mlp_width: int, text: str | None):
        super().__init__()
        self.text = text
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Heads(dim, heads)
        self.attn_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_width)
        self.ada = nn.Linear(dim, 6 * dim)
        if text == "cross":
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Heads(dim, heads)
            self.cross_out = nn.Linear(dim, dim)
        elif text == "joint":  # the caption's own stream: SD3's context block
            self.text_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.text_attn = Heads(dim, heads)
            self.text_attn_out = nn.Linear(dim, dim)
            self.text_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.text_mlp = SwiGLU(dim, mlp_width)
            self.text_ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, text, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, (k, v) = rotate(self.attn.q(h), cos, sin), self.attn.kv(h)
        k = rotate(k, cos, sin)
        if self.text == "joint":
            t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.text_ada(F.silu(c)).chunk(6, dim=1)
            g = modulate(self.text_norm1(text), t_shift1, t_scale1)
            tq, (tk, tv) = self.text_attn.q(g), self.text_attn.kv(g)
            out = attend(torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2))
            text_out, out = out[:, : text.shape[1]], out[:, text.shape[1] :]
            text = text + t_gate1[:, None] * self.text_attn_out(text_out)
            text = text + t_gate2[:, None] * self.text_mlp(modulate(self.text_norm2(text), t_shift2, t_scale2))
        else:
            out = attend(q, k, v)
        x = x + gate1[:, None] * self.attn_out(out)
        if self.text == "cross":
            ck, cv = self.cross.kv(text)
            x = x + self.cross_out(attend(self.cross.q(self.norm_cross(x)), ck, cv))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, text


class SfumatoDiT(ModelMixin, ConfigMixin):
    """(sample, timestep, class_labels | encoder_hidden_states) -> prediction, a diffusion
    transformer. `num_class_embeds` counts the labels including the "no class" one (the last);
    `cross_attention_dim` is the caption states' width (text models); `text_attention` "cross" or
    "joint"; `sample_size` is the default side in the model's own pixels (latent or not)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_class_embeds: int | None = None,
        cross_attention_dim: int | None = None,
        text_attention: str = "cross",
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a multiple of 4 (2D RoPE)")
        if text_attention not in ("cross", "joint"):
            raise ValueError(f"text_attention must be 'cross' or 'joint', got {text_attention!r}")
        out_channels = out_channels or in_channels
        text = text_attention if cross_attention_dim else None
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.class_embed = nn.Embedding(num_class_embeds, hidden_size) if num_class_embeds else None
        if cross_attention_dim:
            self.text_proj = nn.Sequential(
                nn.Linear(cross_attention_dim, hidden_size),
                nn.GELU(approximate="tanh"),
                nn.Linear(hidden_size, hidden_size),
            )
            self.text_pool = nn.Linear(cross_attention_dim, hidden_size)
        width = swiglu_width(hidden_size, mlp_ratio)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, width, text) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.routing: tuple[float, int, int] | None = None
        self.masking: tuple[float, int] | None = None
        self.token_generator: torch.Generator | None = None
        """Where routing and masking draw from (None: torch's global RNG); the loss sets it."""
        self.loss_mask: torch.Tensor | None = None
        """After a masked forward: (batch, 1, height, width), 1 where the output is a prediction."""
        self.repa_depth: int | None = None
        self.repa_tokens: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        """After a training forward with REPA on: (tokens after block repa_depth, their positions
        in the rows x columns grid (batch, tokens), rows, columns)."""
        self._initialize()

    def _initialize(self) -> None:
        """DiT's: Xavier-uniform linears, N(0, 0.02) embeddings, and adaLN-zero (every
        modulation and the output projection start at zero, so each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in self.blocks:
            for name in ("ada", "text_ada"):
                if hasattr(block, name):
                    nn.init.zeros_(getattr(block, name).weight)
                    nn.init.zeros_(getattr(block, name).bias)
        for layer in (self.ada_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_routing(self, ratio: float | None, start: int = 0, end: int | None = None) -> None:
        """TREAD: in training, `ratio` of the image tokens (drawn per image) skip blocks
        start..end-1 and rejoin as they left (end < 0 counts from the depth, as Python's
        indexing); None switches routing off."""
        if ratio is None:
            self.routing = None
            return
        depth = len(self.blocks)
        end = depth if end is None else end + depth if end < 0 else end
        if not 0 < ratio < 1 or not 0 <= start < end <= depth:
            raise ValueError(
                f"routing needs 0 < ratio < 1 and blocks 0 <= start < end <= depth {depth} (end may count "
                f"from the last, -1), got ratio {ratio}, start {start}, end {end}"
            )
        self.routing = (ratio, start, end)

    def set_masking(self, ratio: float | None, mixer_blocks: int = 1) -> None:
        """Patch masking: in training, after the first `mixer_blocks` blocks (which see every
        token, micro_diffusion's patch mixer), `ratio` of the tokens (drawn per image) are
        dropped; the output has zeros there and `loss_mask` says so. None switches it off
        (the unmasking fine-tune at the end of a masked run)."""
        if ratio is None:
            self.masking = None
            return
        if not 0 < ratio < 1 or not 0 <= mixer_blocks < len(self.blocks):
            raise ValueError(
                f"masking needs 0 < ratio < 1 and 0 <= mixer_blocks < depth {len(self.blocks)}, "
                f"got ratio {ratio}, mixer_blocks {mixer_blocks}"
            )
        self.masking = (ratio, mixer_blocks)

    def set_repa(self, depth: int | None) -> None:
        """REPA: in training, keep the tokens after the first `depth` blocks (and their grid
        positions) in `repa_tokens`; None switches it off."""
        if depth is not None and not 1 <= depth <= len(self.blocks):
            raise ValueError(f"REPA aligns the tokens after block 1..{len(self.blocks)} (the depth), got {depth}")
        self.repa_depth, self.repa_tokens = depth, None

    @property
    def draws_tokens(self) -> bool:
        """Whether a forward now draws random tokens (training with routing or masking)."""
        return self.training and (self.routing is not None or self.masking is not None)

    @staticmethod
    def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        cfg = self.config
        batch, _, height, width = sample.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"sample {height}x{width} is not a grid of {p}x{p} patches")
        rows, columns = height // p, width // p
        x = self.patch_embed(sample).flatten(2).transpose(1, 2)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        c = self.time_mlp(self.timestep_features(timestep).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), cfg.num_class_embeds - 1, device=sample.device, dtype=torch.long)
            c = c + self.class_embed(class_labels)
        text = None
        if cfg.cross_attention_dim:
            if encoder_hidden_states is None:
                raise ValueError("a text DiT needs encoder_hidden_states (the caption's token states)")
            states = encoder_hidden_states.to(x.dtype)
            text = self.text_proj(states)
            c = c + self.text_pool(states.mean(dim=1))
        cos, sin = rope_angles(rows, columns, cfg.hidden_size // cfg.num_heads, cfg.rope_theta, sample.device)
        angles = torch.cat([cos, sin], dim=-1).expand(batch, -1, -1, -1)  # travels with its tokens

        mask_ratio, mask_at = self.masking if (self.training and self.masking) else (0.0, -1)
        route_ratio, start, end = self.routing if (self.training and self.routing) else (0.0, -1, -1)
        if start < mask_at < end:
            raise ValueError(f"masking after block {mask_at} falls inside routing's span {start}..{end - 1}")
        repa_at = self.repa_depth if self.training else None
        # Grid positions of the tokens in x, tracked as they are dropped and routed (REPA only).
        where = torch.arange(rows * columns, device=x.device).expand(batch, -1)[..., None] if repa_at else None
        visible = waiting = routed = None
        for i, block in enumerate(self.blocks):
            if i == mask_at:  # the dropped tokens are gone for good
                visible = self._draw(batch, x.shape[1], mask_ratio, x.device)
                x, angles = self._take(x, visible), self._take(angles, visible)
                where = None if where is None else self._take(where, visible)
            if i == start:  # the routed tokens wait, unchanged, for block `end`
                waiting, routed = (x, angles, where), self._draw(batch, x.shape[1], route_ratio, x.device)
                x, angles = self._take(x, routed), self._take(angles, routed)
                where = None if where is None else self._take(where, routed)
            if i == end:
                x, angles, where = self._put(waiting[0], routed, x), waiting[1], waiting[2]
            cos, sin = angles.chunk(2, dim=-1)
            x, text = block(x, c, text, cos, sin)
            if i + 1 == repa_at:
                self.repa_tokens = (x, where[..., 0], rows, columns)
        if end == len(self.blocks):
            x = self._put(waiting[0], routed, x)

        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))
        self.loss_mask = None
        if visible is not None:  # zeros where a token was dropped; loss_mask marks the rest
            kept = self._put(x.new_zeros(batch, rows * columns, 1), visible, x.new_ones(batch, visible.shape[1], 1))
            x = self._put(x.new_zeros(batch, rows * columns, x.shape[-1]), visible, x)
            self.loss_mask = kept.reshape(batch, 1, rows, columns).repeat_interleave(p, 2).repeat_interleave(p, 3)
        out_channels = cfg.out_channels or cfg.in_channels
        x = x.reshape(batch, rows, columns, p, p, out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, out_channels, height, width)
        return Transformer2DModelOutput(sample=x) if return_dict else (x,)

    def _draw(self, batch: int, tokens: int, ratio: float, device) -> torch.Tensor:
        """Indices (batch, kept) of the tokens that go on: 1 - ratio of them, per image, in order."""
        kept = max(1, round(tokens * (1 - ratio)))
        generator = self.token_generator
        scores = torch.rand(batch, tokens, device=generator.device if generator else device, generator=generator)
        return scores.to(device).argsort(dim=1)[:, :kept].sort(dim=1).values

    @staticmethod
    def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (batch, [1,] tokens, width) at the token indices (batch, kept)."""
        if x.ndim == 4:
            return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    @staticmethod
    def _put(full: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`full` with its tokens at `index` replaced by x's."""
        return full.scatter(1, index[..., None].expand(-1, -1, full.shape[-1]), x)
