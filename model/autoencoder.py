"""The FLUX.1 image autoencoder (`ae.safetensors`): RGB images <-> 16-channel latents at 1/8 resolution.

A convolutional KL autoencoder in the latent-diffusion style. The encoder halves the resolution three times
(ch_mult [1, 2, 4, 4] gives four levels, three stride-2 convs) and ends in the mean and log-variance of a
diagonal Gaussian over the latent; the decoder mirrors it with nearest-neighbour upsampling. One single-head
self-attention layer sits at the lowest resolution of each half. Module attribute names are the key names of
the official checkpoint, so it loads with no renaming:

    ae = weights.build(AutoEncoder, CONFIGS["flux"], "ae.safetensors", dtype=torch.float32)
    latent = ae.encode(image)            # [B, 3, H, W] in [-1, 1]  ->  [B, 16, H/8, W/8], scaled and shifted
    image = ae.decode(latent)            # and back

FLUX works on `latent = scale_factor * (mean - shift_factor)`, which has roughly unit variance; `encode`
returns that directly and `decode` undoes it. For large images `encode(..., tile=...)` and
`decode(..., tile=...)` run the network on overlapping tiles and blend them, so memory stays bounded
(e.g. `ae.decode(latent, tile=512, overlap=128)` for a 4K image: 512 x 512-pixel tiles, 128-pixel cross-fades).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.tiling import in_units, run_tiled


@dataclass
class AutoEncoderParams:
    resolution: int  # training resolution; recorded for reference, the network is fully convolutional
    in_channels: int  # image channels (3)
    ch: int  # channels of the first level; level i has ch * ch_mult[i]
    out_ch: int  # decoded image channels (3)
    ch_mult: list[int]
    num_res_blocks: int  # residual blocks per encoder level (the decoder has one more per level)
    z_channels: int  # latent channels (16)
    scale_factor: float  # latent = scale_factor * (z - shift_factor)
    shift_factor: float


CONFIGS = {
    "flux": AutoEncoderParams(
        resolution=256,
        in_channels=3,
        ch=128,
        out_ch=3,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
}


def group_norm(channels: int) -> nn.GroupNorm:
    """The one normalisation used throughout: GroupNorm with 32 groups, eps 1e-6, learned scale and shift."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


# ------------------------------------------------------------------------------------------- building blocks


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 conv on the skip path when the width changes.

    [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        # Attribute absent (not None) when unused, so the parameter names match the checkpoint exactly.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the projections. [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. [B, C, H, W] -> [B, C, H/2, W/2] (H, W even)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # The original pads one zero row/column at the bottom/right only (not on all sides), before the conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution. [B, C, h, w] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: `num_blocks` resnets, then (except at the last level) a Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        if downsample:
            self.downsample = Downsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class UpLevel(nn.Module):
    """One decoder resolution level: `num_blocks` resnets, then (except at the full-resolution level) an Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


# ------------------------------------------------------------------------------------------- encoder, decoder


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> Gaussian moments [B, 2 * z_channels, H/f, W/f], f = 2**(len(ch_mult)-1).

    The first z_channels output channels are the mean, the rest the log-variance.
    """

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        levels = len(widths)
        self.conv_in = conv3x3(p.in_channels, p.ch)
        self.down = nn.ModuleList(
            DownLevel(([p.ch] + widths)[i], widths[i], p.num_res_blocks, downsample=i < levels - 1)
            for i in range(levels)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3x3(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent z [B, z_channels, h, w] (unscaled) -> image [B, out_ch, h*f, w*f].

    `up[i]` is the level at the same resolution as the encoder's `down[i]`, so `up` runs in reverse order
    (lowest resolution first). Each decoder level has one more resnet than the encoder's.
    """

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        levels = len(widths)
        self.conv_in = conv3x3(p.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # Level i takes the output width of level i + 1 (or of the mid block, for the last level).
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, levels - 1)], widths[i], p.num_res_blocks + 1, upsample=i > 0)
            for i in range(levels)
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = conv3x3(widths[0], p.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ------------------------------------------------------------------------------------------- the autoencoder


class AutoEncoder(nn.Module):
    """FLUX.1's autoencoder. `encode`: image in [-1, 1] -> scaled latent; `decode`: scaled latent -> image.

    Inputs are cast to the parameters' dtype (float32 or bfloat16); outputs come in that dtype.
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.downscale = 2 ** (len(params.ch_mult) - 1)  # 8 for FLUX: one latent pixel per 8x8 image pixels

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(
        self,
        image: Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile: int | None = None,
        overlap: int = 128,
    ) -> Tensor:
        """[B, in_channels, H, W] in [-1, 1] -> latent [B, z_channels, H/f, W/f] = scale * (z - shift).

        z is the posterior mean, or with `sample=True` a draw mean + std * noise (noise from `generator`).
        `tile` (pixels, a multiple of f) encodes overlapping tiles of at most tile x tile pixels that overlap
        by `overlap` pixels and blends them linearly; None encodes the whole image at once. See `run_tiled`.
        """
        self._check_image(image)
        image = image.to(self.dtype)
        if tile is None:
            moments = self.encoder(image)
        else:
            tile, overlap = in_units(tile, overlap, self.downscale)
            moments = run_tiled(self.encoder, image, tile, overlap, in_scale=self.downscale, out_scale=1)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            # The clamp keeps exp() finite for untrained or extreme inputs; trained models stay far inside it.
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, latent: Tensor, tile: int | None = None, overlap: int = 128) -> Tensor:
        """Latent [B, z_channels, h, w] (as returned by `encode`) -> image [B, out_ch, h*f, w*f], about [-1, 1].

        `tile` / `overlap` (pixels of the output image, multiples of f) decode overlapping tiles and blend them.
        """
        if latent.ndim != 4 or latent.shape[1] != self.params.z_channels:
            raise ValueError(f"latent must be [B, {self.params.z_channels}, h, w]; got shape {list(latent.shape)}")
        z = latent.to(self.dtype) / self.params.scale_factor + self.params.shift_factor
        if tile is None:
            return self.decoder(z)
        tile, overlap = in_units(tile, overlap, self.downscale)
        return run_tiled(self.decoder, z, tile, overlap, in_scale=1, out_scale=self.downscale)

    def forward(self, image: Tensor) -> Tensor:
        """Reconstruction through the posterior mean: decode(encode(image))."""
        return self.decode(self.encode(image))

    def _check_image(self, image: Tensor) -> None:
        c, f = self.params.in_channels, self.downscale
        if image.ndim != 4 or image.shape[1] != c or image.shape[2] % f or image.shape[3] % f:
            raise ValueError(
                f"image must be [B, {c}, H, W] with H and W multiples of {f} (the autoencoder downsamples by {f}); "
                f"got shape {list(image.shape)}. Note that the FLUX transformer packs 2x2 latent patches, so "
                f"for FLUX H and W must be multiples of {2 * f}."
            )
