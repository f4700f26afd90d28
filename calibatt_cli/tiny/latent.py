"""A fixed, invertible latent space for the tiny model: space-and-time-to-channel (pixel unshuffle).

Why not a trained VAE: the procedural clips are flat colours on plain backgrounds, so a learned codec
would buy little compression and cost training time and a second source of error. A fixed rearrangement
is exact (decode(encode(x)) == x), costs nothing, and its output is still a Wan-shaped latent
[B, C, T, H, W] that `WanPipeline` samples and decodes like any other.

Layout, following Wan's causal VAE: a clip of 1 + st*k frames becomes 1 + k latent frames. Latent frame 0
holds frame 0 (repeated st times so every latent frame has the same channels); latent frame t >= 1
holds frames st*(t-1)+1 ... st*t. Each latent pixel holds an ss x ss patch of pixels, so
z_dim = 3 * st * ss * ss.

`WanPipeline` reads from its VAE only `config.scale_factor_temporal`, `config.scale_factor_spatial`,
`config.z_dim`, `config.latents_mean`, `config.latents_std`, `dtype` and `decode(z, return_dict=False)[0]`
(video in [-1, 1], [B, 3, F, H, W]); this module provides exactly those (plus `encode` for training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


def space_time_to_channel(video: torch.Tensor, st: int, ss: int) -> torch.Tensor:
    """[B, 3, 1 + st*k, H, W] in [-1, 1] -> [B, 3*st*ss*ss, 1 + k, H/ss, W/ss]."""
    b, c, f, h, w = video.shape
    if (f - 1) % st or h % ss or w % ss:
        raise ValueError(f"video of {f} frames {h}x{w} does not fit strides (time {st}, space {ss})")
    first = video[:, :, :1].expand(b, c, st, h, w)
    x = torch.cat([first, video[:, :, 1:]], dim=2)  # [B, C, st*(1+k), H, W]
    t = x.shape[2] // st
    x = x.reshape(b, c, t, st, h // ss, ss, w // ss, ss)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, st, ss, ss, T, h, w]
    return x.reshape(b, c * st * ss * ss, t, h // ss, w // ss)


def channel_to_space_time(z: torch.Tensor, st: int, ss: int, channels: int = 3) -> torch.Tensor:
    """Inverse of space_time_to_channel; latent frame 0's st copies of frame 0 are averaged."""
    b, zc, t, h, w = z.shape
    if zc != channels * st * ss * ss:
        raise ValueError(f"latent has {zc} channels, expected {channels * st * ss * ss}")
    x = z.reshape(b, channels, st, ss, ss, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, channels, t * st, h * ss, w * ss)
    return torch.cat([x[:, :, :st].mean(dim=2, keepdim=True), x[:, :, st:]], dim=2)


@dataclass
class _DecoderOutput:
    sample: torch.Tensor


class PixelShuffleLatent(ModelMixin, ConfigMixin):
    """The AutoencoderKLWan interface over the fixed transform above (no trainable weights)."""

    @register_to_config
    def __init__(
        self,
        scale_factor_temporal: int = 2,
        scale_factor_spatial: int = 2,
        in_channels: int = 3,
        z_dim: int = 24,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        expected = in_channels * scale_factor_temporal * scale_factor_spatial**2
        if z_dim != expected:
            raise ValueError(f"z_dim={z_dim} but the strides give {expected} channels")
        # Pixels in [-1, 1] are already of unit scale: the identity normalisation, spelled out because
        # WanPipeline reads both lists.
        if latents_mean is None:
            self.register_to_config(latents_mean=[0.0] * z_dim)
        if latents_std is None:
            self.register_to_config(latents_std=[1.0] * z_dim)
        # A buffer so `dtype` and `.to(...)` behave as for any diffusers model.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised latent (what the transformer sees)."""
        z = space_time_to_channel(video, self.config.scale_factor_temporal, self.config.scale_factor_spatial)
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Raw (de-normalised, as WanPipeline passes it) latent -> video in [-1, 1]."""
        video = channel_to_space_time(
            z, self.config.scale_factor_temporal, self.config.scale_factor_spatial, self.config.in_channels
        ).clamp(-1.0, 1.0)
        return _DecoderOutput(video) if return_dict else (video,)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std
