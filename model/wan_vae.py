"""The Wan2.1 video VAE: a causal 3-D convolutional autoencoder, written to load `Wan2.1_VAE.pth` as it is.

Every attribute name below is a key of the official checkpoint, so its state dict loads with `load_state_dict`
and no renaming. With the released config (dim 96, dim_mult (1, 2, 4, 4)) the network is:

    video [B, 3, F, H, W] in [-1, 1]
      encoder.conv1                          3x3x3 causal conv, 3 -> 96
      encoder.downsamples.0-10               per level: 2 residual blocks, then a stride-2 downsample
                                             (levels 96, 192, 384, 384; time is halved at levels 2 and 3)
      encoder.middle                         residual block, per-frame attention, residual block (384)
      encoder.head                           RMS norm, SiLU, 3x3x3 causal conv 384 -> 32
      conv1                                  1x1x1 conv, 32 -> (mean, log-variance), 16 channels each
    latent [B, 16, (F-1)/4 + 1, H/8, W/8]
      conv2                                  1x1x1 conv, 16 -> 16
      decoder.conv1, decoder.middle          3x3x3 causal conv 16 -> 384, then as the encoder's middle
      decoder.upsamples.0-14                 per level: 3 residual blocks, then a 2x upsample that halves the
                                             channels (time is doubled at the first two levels)
      decoder.head                           RMS norm, SiLU, 3x3x3 causal conv 96 -> 3
    video [B, 3, F, H, W], clamped to [-1, 1]

Causality. Every temporal kernel looks only at the current and earlier frames (zero frames stand in before the
start), and the temporal resamplers treat the first frame on its own: the encoder maps frame 0 to latent frame 0
and each following group of 4 frames to one latent frame; the decoder maps latent frame 0 to frame 0 and each
following latent frame to 4 frames. Hence F = 4k + 1 frames <-> k + 1 latent frames, and the first frame of a
video is encoded exactly as a still image would be.

Chunked processing. Because every layer is causal, a clip can be fed in pieces: `encode` feeds frame 0, then 4
frames at a time; `decode` feeds one latent frame at a time. A `CausalCache` (a plain dict, one per call) carries
what each layer must remember from one piece to the next -- at most the last 2 input frames of each temporal
conv -- so the memory for activations does not grow with the clip length. Feeding a whole clip as one piece
gives the same result (the tests check this).

Latent normalisation. `encode` returns the posterior mean normalised per channel, (mu - mean) / std, with the 16
published statistics below; `decode` undoes it. These are the latents the Wan DiT works on.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model import tiling


@dataclass
class WanVAEConfig:
    dim: int = 96  # base width; level widths are dim * dim_mult
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level (the decoder has one more per level)
    attn_scales: tuple[float, ...] = ()  # attention outside the middle blocks: none in Wan2.1 (only () supported)
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per downsample, encoder order (official spelling)
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip


CONFIGS = {"wan2.1": WanVAEConfig()}

# Official checkpoint file name inside a Wan2.1 snapshot.
CHECKPOINT_NAMES = {"wan2.1": "Wan2.1_VAE.pth"}

# What the causal layers remember between chunks of frames, keyed by the layer itself: for a temporal conv, the
# last (at most 2) frames of its input seen so far. Start each encode/decode with an empty dict.
CausalCache = dict[nn.Module, Tensor]


def to_frames(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], for layers that work on each frame alone."""
    return rearrange(x, "b c t h w -> (b t) c h w")


def to_video(x: Tensor, batch: int) -> Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    return rearrange(x, "(b t) c h w -> b c t h w", b=batch)


# ---------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma, the norm taken over the channel axis (dim 1) at every pixel.

    gamma is [C, 1, 1, 1] for videos [B, C, T, H, W] and [C, 1, 1] for frames [N, C, H, W], as stored in the
    checkpoint. The normalisation is computed in float32 (the norm clamps at 1e-12, there is no other eps).
    """

    def __init__(self, dim: int, video: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.normalize(x.float(), dim=1).to(x.dtype)
        return normed * self.gamma.shape[0] ** 0.5 * self.gamma


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution with temporal kernel 3 that sees only the current and the two previous frames.

    Spatially it pads like a 'same' convolution. In time it is preceded by the last 2 input frames of the previous
    chunk (from `cache`), or by zero frames where the stream has fewer than 2 frames behind it, so that
    [B, C_in, T, H, W] -> [B, C_out, T, H, W] and chunked input gives the same output as the whole clip.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: tuple[int, int, int] = (3, 3, 3)):
        super().__init__(in_dim, out_dim, kernel_size)
        assert self.kernel_size[0] == 3, "the memory below assumes 2 frames of temporal context"
        self.time_pad = 2
        self.space_pad = (self.kernel_size[2] // 2,) * 2 + (self.kernel_size[1] // 2,) * 2  # (W, W, H, H)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        past = cache.get(self)
        if past is not None:
            x = torch.cat([past, x], dim=2)
        cache[self] = x[:, :, -self.time_pad :].clone()  # clone: a view would keep the whole chunk alive
        missing = self.time_pad - (0 if past is None else past.shape[2])
        return super().forward(F.pad(x, (*self.space_pad, missing, 0)))


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))) with 3x3x3 causal convs; a 1x1x1 conv on x when widths differ.

    `residual` keeps the checkpoint's indices: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout (training only,
    here an identity), 6 conv. [B, in_dim, T, H, W] -> [B, out_dim, T, H, W].
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.ModuleList([
            RMSNorm(in_dim, video=True), nn.SiLU(), CausalConv3d(in_dim, out_dim),
            RMSNorm(out_dim, video=True), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim),
        ])  # fmt: skip
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h = conv1(act1(norm1(x)), cache)
        h = conv2(act2(norm2(h)), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """x + proj(attention(norm(x))): single-head self-attention among the H*W pixels of each frame.

    Frames do not attend to each other, so nothing needs to be remembered between chunks. [B, C, T, H, W] in and
    out; q, k, v are the three C-channel thirds of the 1x1 conv `to_qkv`.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[3]
        qkv = self.to_qkv(self.norm(to_frames(x)))  # [B*T, 3C, H, W]
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        out = self.proj(rearrange(out, "n 1 (h w) c -> n c h w", h=height))
        return x + to_video(out, x.shape[0])


class Downsample(nn.Module):
    """Halve H and W; with `temporal`, also halve the frames after the first.

    Space: zero-pad one pixel on the right and bottom, then a stride-2 3x3 conv on each frame (`resample.1`).
    Time: frame 0 passes unchanged, then output j >= 1 is `time_conv` (kernel 3, stride 2, no padding) over
    frames 2j-2, 2j-1, 2j -- so 1 + 2n frames -> 1 + n. Between chunks the last frame is remembered, as it opens
    the next window. [B, C, T, H, W] -> [B, C, T', H/2, W/2] with T' = T without `temporal`, else (T-1)/2 + 1 for
    the chunk that starts the stream and T/2 for later chunks.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = to_video(self.resample(to_frames(x)), x.shape[0])
        if self.time_conv is None:
            return x
        out = []
        if self.time_conv not in cache:  # stream start: frame 0 is kept as it is, and opens the first window
            out.append(x[:, :, :1])
            cache[self.time_conv] = x[:, :, :1].clone()
            x = x[:, :, 1:]
        if x.shape[2] > 0:
            window = torch.cat([cache[self.time_conv], x], dim=2)  # [B, C, 1 + 2n, H, W]
            cache[self.time_conv] = x[:, :, -1:].clone()
            out.append(self.time_conv(window))
        return torch.cat(out, dim=2)


class Upsample(nn.Module):
    """Double H and W and halve the channels; with `temporal`, also double the frames after the first.

    Time first: frame 0 passes unchanged; every later frame goes through the causal `time_conv` (C -> 2C, its
    stream starting at frame 1 with zero padding), and each output's two channel halves become two consecutive
    frames, so 1 + n frames -> 1 + 2n. Space: nearest-exact 2x upsampling, then a 3x3 conv C -> C/2 on each frame
    (`resample.1`). [B, C, T, H, W] -> [B, C/2, T', 2H, 2W] with T' = T without `temporal`, else 2T - 1 for the
    chunk that starts the stream and 2T for later chunks.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.time_conv is not None:
            out = []
            if self.time_conv not in cache:  # stream start: frame 0 is not doubled
                out.append(x[:, :, :1])
                cache[self.time_conv] = x[:, :, :0]  # empty memory: zero padding before frame 1
                x = x[:, :, 1:]
            if x.shape[2] > 0:
                pairs = self.time_conv(x, cache)  # [B, 2C, n, H, W]
                out.append(rearrange(pairs, "b (two c) t h w -> b c (t two) h w", two=2))
            x = torch.cat(out, dim=2)
        return to_video(self.resample(to_frames(x)), x.shape[0])


# ---------------------------------------------------------------------------------------------- encoder, decoder


class Encoder3d(nn.Module):
    """video [B, 3, T, H, W] -> [B, 2 * z_dim, (T-1)/4 + 1, H/8, W/8] (mean and log-variance, before `conv1`)."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0])
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=config.temperal_downsample[level]))
        self.downsamples = nn.ModuleList(blocks)
        width = widths[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = nn.ModuleList([RMSNorm(width, video=True), nn.SiLU(), CausalConv3d(width, 2 * config.z_dim)])

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder3d(nn.Module):
    """latent [B, z_dim, T, h, w] (after `conv2`) -> video [B, 3, 4(T-1) + 1, 8h, 8w], not yet clamped."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        widths = [config.dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temperal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, widths[0])
        self.middle = nn.ModuleList(
            [ResidualBlock(widths[0], widths[0]), AttentionBlock(widths[0]), ResidualBlock(widths[0], widths[0])]
        )
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(widths[:-1], widths[1:])):
            if level > 0:
                in_dim //= 2  # the previous level's Upsample halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                blocks.append(Upsample(out_dim, temporal=temporal_upsample[level]))
        self.upsamples = nn.ModuleList(blocks)
        width = widths[-1]
        self.head = nn.ModuleList([RMSNorm(width, video=True), nn.SiLU(), CausalConv3d(width, 3)])

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        for block in self.upsamples:
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


# ---------------------------------------------------------------------------------------------- the VAE


class WanVAE(nn.Module):
    """The Wan2.1 VAE: `encode` videos to normalised latents, `decode` them back, chunk by chunk.

    Both run in the dtype of the weights (float32 as in the paper, or bfloat16) and return float32. Call them
    under `torch.no_grad()` (the VAE is frozen here); with gradients on, every chunk's activations are kept.
    """

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        if config.attn_scales:
            raise ValueError(f"attn_scales={config.attn_scales}: attention outside the middle blocks is not "
                             "implemented (Wan2.1 has none; use attn_scales=())")
        if len(config.temperal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs one entry per downsample ({len(config.dim_mult) - 1}), "
                             f"got {config.temperal_downsample}")
        if not len(config.latents_mean) == len(config.latents_std) == config.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={config.z_dim} entries each, got "
                             f"{len(config.latents_mean)} and {len(config.latents_std)}")
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> (mean, log-variance) of the posterior
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4)."""
        return 2 ** sum(self.config.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8)."""
        return 2 ** (len(self.config.dim_mult) - 1)

    def normalize(self, mu: Tensor) -> Tensor:
        """Posterior mean [B, z_dim, T, h, w] -> (mu - mean) / std per channel, in float32."""
        mean, std = self._statistics(mu.device)
        return (mu.float() - mean) / std

    def denormalize(self, latent: Tensor) -> Tensor:
        """Inverse of `normalize`: latent * std + mean per channel, in float32."""
        mean, std = self._statistics(latent.device)
        return latent.float() * std + mean

    def _statistics(self, device: torch.device) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tile: int | None = None, overlap: int = 64) -> Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k + 1, H and W multiples of 8
        -> normalised latent [B, z_dim, k + 1, H/8, W/8], float32 (the posterior mean; with `sample=True` a draw
        mu + exp(log_var / 2) * noise, noise from `generator`, normalised the same way).

        The encoder sees frame 0, then 4 frames at a time, remembering the causal context in between. `tile` /
        `overlap` (pixels, multiples of 8): the whole clip is encoded in overlapping spatial tiles of at most
        tile x tile pixels, each with its own causal context, and the posterior moments are blended
        (model/tiling.py); memory is then bounded by the tile, not the frame.
        """
        self._check_video(video)
        video = video.to(self.conv1.weight.dtype)
        if tile is None:
            moments = self._moments(video)
        else:
            tile, overlap = tiling.in_units(tile, overlap, self.spatial_factor)
            moments = tiling.run_tiled(self._moments, video, tile, overlap, in_scale=self.spatial_factor, out_scale=1)
        mu, log_var = moments.chunk(2, dim=1)
        if sample:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            mu = mu + torch.exp(0.5 * log_var.clamp(-30.0, 20.0)) * noise
        return self.normalize(mu)

    def _moments(self, video: Tensor) -> Tensor:
        """The posterior's (mean, log-variance) [B, 2 z_dim, k + 1, h, w] of a clip, chunk by chunk in time."""
        step = self.temporal_factor
        cache: CausalCache = {}
        latents = [self.encoder(video[:, :, :1], cache)]
        for start in range(1, video.shape[2], step):
            latents.append(self.encoder(video[:, :, start : start + step], cache))
        return self.conv1(torch.cat(latents, dim=2))

    def decode(self, latent: Tensor, tile: int | None = None, overlap: int = 64) -> Tensor:
        """normalised latent [B, z_dim, T, h, w] -> video [B, 3, 4(T-1) + 1, 8h, 8w] in [-1, 1], float32.

        The decoder sees one latent frame at a time, remembering the causal context in between; the result is
        clamped to [-1, 1] as the reference does. `tile` / `overlap` (pixels of the output): decoded in
        overlapping spatial tiles, each with its own causal context, blended (as `encode`).
        """
        self._check_latent(latent)
        z = self.conv2(self.denormalize(latent).to(self.conv2.weight.dtype))
        if tile is None:
            frames = self._frames(z)
        else:
            tile, overlap = tiling.in_units(tile, overlap, self.spatial_factor)
            frames = tiling.run_tiled(self._frames, z, tile, overlap, in_scale=1, out_scale=self.spatial_factor)
        return frames.float().clamp(-1.0, 1.0)

    def _frames(self, z: Tensor) -> Tensor:
        """Decoded frames [B, 3, 4(T-1) + 1, 8h, 8w] of z [B, z_dim, T, h, w], one latent frame at a time."""
        cache: CausalCache = {}
        return torch.cat([self.decoder(z[:, :, i : i + 1], cache) for i in range(z.shape[2])], dim=2)

    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5:
            raise ValueError(f"WanVAE.encode expects a video [B, 3, F, H, W], got a tensor of shape "
                             f"{tuple(video.shape)} ({video.ndim} dims)")
        _, channels, frames, height, width = video.shape
        if channels != 3:
            raise ValueError(f"WanVAE.encode expects 3 (RGB) channels in [B, 3, F, H, W], got {channels} "
                             f"(shape {tuple(video.shape)})")
        if not video.is_floating_point():
            raise ValueError(f"WanVAE.encode expects a floating video in [-1, 1], got dtype {video.dtype}")
        step = self.temporal_factor
        if frames < 1 or (frames - 1) % step:
            below = (frames - 1) // step * step + 1
            near = f"{below} or {below + step}" if below >= 1 else "1"
            raise ValueError(f"WanVAE.encode needs {step}k+1 frames (1, {1 + step}, {1 + 2 * step}, ...), got "
                             f"{frames}; the nearest valid counts are {near}")
        factor = self.spatial_factor
        if height % factor or width % factor:
            raise ValueError(f"WanVAE.encode needs H and W divisible by {factor}, got {height}x{width} (the Wan "
                             f"DiT's 2x2 patches on the latent further need multiples of {2 * factor})")

    def _check_latent(self, latent: Tensor) -> None:
        z_dim = self.config.z_dim
        if latent.ndim != 5:
            raise ValueError(f"WanVAE.decode expects a latent [B, {z_dim}, T, h, w], got a tensor of shape "
                             f"{tuple(latent.shape)} ({latent.ndim} dims)")
        if latent.shape[1] != z_dim:
            raise ValueError(f"WanVAE.decode expects {z_dim} latent channels in [B, {z_dim}, T, h, w], got "
                             f"{latent.shape[1]} (shape {tuple(latent.shape)})")
        if latent.shape[2] < 1:
            raise ValueError(f"WanVAE.decode needs at least one latent frame, got shape {tuple(latent.shape)}")
