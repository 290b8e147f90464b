"""Python reference sampling for training-time eval: SD / SDXL conditioning, CFG, DDIM and
Euler-ancestral with the SD scaled_linear schedule and 'leading' spacing (steps_offset 1)."""
import numpy as np
import torch

import world

T = 1000
BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)
TIME_IDS = [256.0, 256.0, 0.0, 0.0, 256.0, 256.0]


def ids_tensor(caps, pad):
    return torch.tensor([world.tokenize(c, pad_id=pad) for c in caps], dtype=torch.long)


def encode_sd(te, caps):
    last, _, _ = te(ids_tensor(caps, world.EOS))
    return last


def encode_xl(te1, te2, caps, zero_empty=True):
    _, _, hs1 = te1(ids_tensor(caps, world.EOS))
    _, pooled, hs2 = te2(ids_tensor(caps, 0))
    ctx = torch.cat([hs1[-2], hs2[-2]], dim=-1)
    if zero_empty:
        keep = torch.tensor([0.0 if c == '' else 1.0 for c in caps])
        ctx = ctx * keep[:, None, None]
        pooled = pooled * keep[:, None]
    return ctx, pooled


def leading_timesteps(steps):
    ratio = T // steps
    return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + 1


@torch.no_grad()
def sample(unet, cond, uncond, seeds, h=32, w=32, steps=25, cfg=7.0, method='ddim'):
    """cond/uncond: dict of unet kwargs besides sample/timestep (batched per prompt)."""
    n = len(seeds)
    lat = torch.stack([torch.randn(4, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    kw = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    ts = leading_timesteps(steps)
    ac = ALPHAS_CUMPROD.float()

    def eps(x, t):
        e = unet(torch.cat([x, x]), torch.full((2 * n,), int(t), dtype=torch.long), **kw)
        eu, ec = e.chunk(2)
        return eu + cfg * (ec - eu)

    if method == 'ddim':
        x = lat
        for i, t in enumerate(ts):
            a = ac[t]
            ap = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            e = eps(x, t)
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            x = ap.sqrt() * x0 + (1 - ap).sqrt() * e
        return x
    # euler ancestral (k-diffusion / diffusers EulerAncestralDiscreteScheduler)
    sig = ((1 - ac) / ac).sqrt()
    sigmas = torch.cat([sig[torch.from_numpy(ts.copy())], torch.zeros(1)])
    x = lat * (sigmas[0] ** 2 + 1).sqrt()
    g = torch.Generator().manual_seed(int(seeds[0]) + 999)
    for i, t in enumerate(ts):
        s, sn = sigmas[i], sigmas[i + 1]
        e = eps(x / (s ** 2 + 1).sqrt(), t)
        x0 = x - s * e
        su = (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2).sqrt()
        sd = (sn ** 2 - su ** 2).sqrt()
        x = x + (x - x0) / s * (sd - s)
        if sn > 0:
            x = x + torch.randn(x.shape, generator=g) * su
    return x


@torch.no_grad()
def decode(dec, lat, scaling_factor):
    img = dec(lat / scaling_factor)
    return list(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
