"""Kiln-tiny networks: KL VAE (8x, 4 latent channels), tiny CLIP-like causal text encoders with an
in-graph vocabulary lookup, and a small conditional UNet (SD / SDXL interfaces)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EOS = 49407


# ----------------------------------------------------------------------------- VAE
class ResBlockPlain(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1 = nn.GroupNorm(8, c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.n2 = nn.GroupNorm(8, c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return x + h


class VAEEncoder(nn.Module):
    def __init__(self, ch=(32, 64, 128), zc=4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch[0], 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(ch[0], ch[1], 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(ch[1], ch[2], 3, stride=2, padding=1), nn.SiLU(),
            ResBlockPlain(ch[2]),
            nn.GroupNorm(8, ch[2]), nn.SiLU(),
            nn.Conv2d(ch[2], 2 * zc, 3, padding=1))

    def forward(self, x):
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)


class VAEDecoder(nn.Module):
    """extra=True adds one residual block at 2x and one at 4x (zero-initialised, so a decoder trained without
    them starts out unchanged): the capacity that keeps small triangles' apexes sharp."""

    def __init__(self, ch=(128, 64, 32), zc=4, extra=False):
        super().__init__()
        self.extra = extra
        self.inp = nn.Conv2d(zc, ch[0], 3, padding=1)
        self.res = nn.Sequential(ResBlockPlain(ch[0]), ResBlockPlain(ch[0]))
        self.up1 = nn.Sequential(nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], ch[1] * 4, 1), nn.PixelShuffle(2))
        self.b1 = nn.Sequential(nn.Conv2d(ch[1], ch[1], 3, padding=1), nn.SiLU())
        self.up2 = nn.Sequential(nn.Conv2d(ch[1], ch[2] * 4, 1), nn.PixelShuffle(2))
        self.b2 = nn.Sequential(nn.Conv2d(ch[2], ch[2], 3, padding=1), nn.SiLU())
        self.out = nn.Sequential(nn.Conv2d(ch[2], 3 * 4, 3, padding=1), nn.PixelShuffle(2))
        if extra:
            self.r1, self.r2 = ResBlockPlain(ch[1]), ResBlockPlain(ch[2])
            for r in (self.r1, self.r2):
                nn.init.zeros_(r.c2.weight)
                nn.init.zeros_(r.c2.bias)

    def forward(self, z):
        h = self.res(self.inp(z))
        h = self.up1(h)
        h = h + self.b1(h)
        if self.extra:
            h = self.r1(h)
        h = self.up2(h)
        h = h + self.b2(h)
        if self.extra:
            h = self.r2(h)
        return self.out(h)


def load_decoder(vae_ckpt):
    """The decoder of a VAE checkpoint (a dict with 'dec', and 'dec_extra' when written by
    finetune_decoder.py --extra)."""
    dec = VAEDecoder(extra=bool(vae_ckpt.get('dec_extra', False)))
    dec.load_state_dict(vae_ckpt['dec'])
    return dec


# ----------------------------------------------------------------------------- text encoder
class TBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        for lin in (self.o, self.mlp[2]):  # residual branches start at zero: token identity dominates at init
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, mask):
        B, S, D = x.shape
        hd = D // self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(B, S, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) * (hd ** -0.5) + mask
        a = a.softmax(-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.ln2(x))


class TextEncoder(nn.Module):
    """CLIP-like causal text transformer. ids (int32/int64 CLIP ids) -> row via uint8 LUT -> embedding.
    Returns (last_hidden_state, pooled (EOS token), [hidden_states 0..L])."""

    def __init__(self, lut, n_rows, d=128, layers=2, heads=4, seq=77, proj_dim=None):
        super().__init__()
        self.register_buffer('lut', torch.as_tensor(lut, dtype=torch.uint8), persistent=True)
        self.tok = nn.Embedding(n_rows, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        nn.init.normal_(self.tok.weight, std=1.0)  # strong, distinct word vectors (avoids conditioning collapse)
        self.blocks = nn.ModuleList([TBlock(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.register_buffer('causal', torch.full((seq, seq), -1e4).triu(1), persistent=False)
        self.proj = nn.Linear(d, proj_dim, bias=False) if proj_dim else None

    def forward(self, ids):
        rows = self.lut[ids.long()].long()
        x = self.tok(rows) + self.pos[None]
        hs = [x]
        for b in self.blocks:
            x = b(x, self.causal)
            hs.append(x)
        last = self.ln_f(x)
        eos_pos = (ids == EOS).float().argmax(-1)
        pooled = last[torch.arange(last.shape[0]), eos_pos]
        if self.proj is not None:
            pooled = self.proj(pooled)
        return last, pooled, hs


# ----------------------------------------------------------------------------- UNet
def timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, e):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(e, 2 * cout)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x)))
        s, b = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + s) + b
        h = self.c2(F.silu(h))
        return self.skip(x) + h


class Attn(nn.Module):
    def __init__(self, c, dc, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.o1 = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.q2 = nn.Linear(c, c)
        self.kv2 = nn.Linear(dc, 2 * c)
        self.o2 = nn.Linear(c, c)
        self.ln3 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def _split(self, t):
        B, N, C = t.shape
        return t.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)

    def _attn(self, q, k, v):
        B, H, N, hd = q.shape
        a = ((q @ k.transpose(-1, -2)) * (hd ** -0.5)).softmax(-1) @ v
        return a.transpose(1, 2).reshape(B, N, H * hd)

    def forward(self, x, ctx):
        B, C, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.ln1(t)).chunk(3, dim=-1)
        t = t + self.o1(self._attn(self._split(q), self._split(k), self._split(v)))
        k2, v2 = self.kv2(ctx).chunk(2, dim=-1)
        t = t + self.o2(self._attn(self._split(self.q2(self.ln2(t))), self._split(k2), self._split(v2)))
        t = t + self.mlp(self.ln3(t))
        return t.transpose(1, 2).reshape(B, C, h, w)


class SpatialFiLM(nn.Module):
    """Adds a text-dependent spatial map to a feature map: the conditioning vector picks, per channel, a mix of
    4x4 low-frequency 2-D cosine basis images over the normalised image plane (any resolution). Linear in the
    text, so 'at the left' can move features left without the network having to discover a multiplicative
    coordinate x text interaction first. Zero-initialised (a warm start begins unchanged)."""

    def __init__(self, e, c, k=4):
        super().__init__()
        self.c, self.k = c, k
        self.proj = nn.Linear(e, c * k * k)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb):
        B, C, h, w = x.shape
        freqs = torch.arange(self.k, dtype=torch.float32) * math.pi
        by = torch.cos(freqs[:, None] * ((torch.arange(h, dtype=torch.float32) + 0.5) / h)[None])  # [k, h]
        bx = torch.cos(freqs[:, None] * ((torch.arange(w, dtype=torch.float32) + 0.5) / w)[None])  # [k, w]
        basis = (by[:, None, :, None] * bx[None, :, None, :]).reshape(self.k * self.k, h * w)
        coef = self.proj(emb).reshape(B * C, self.k * self.k)
        return x + (coef @ basis).reshape(B, C, h, w)


class UNet(nn.Module):
    """sample [B,4,h,w] (h,w even), timestep [B], encoder_hidden_states [B,77,ctx_dim]
    (+ text_embeds [B,P], time_ids [B,6] for xl) -> eps [B,4,h,w].
    Internally: pixel-unshuffle(2) + coordinate channels, 2 resolution levels (h/2, h/4)."""

    def __init__(self, ctx_dim, c1=96, c2=192, dc=128, e=256, xl_pooled_dim=None, param='eps', last_tok=False,
                 spatial=False):
        super().__init__()
        self.xl = xl_pooled_dim is not None
        # param='v': the network body predicts v = sqrt(a)*eps - sqrt(1-a)*x0 and the graph converts it to the
        # epsilon output, eps = sqrt(1-a)*x_t + sqrt(a)*v (EDM-style preconditioning; the I/O contract stays eps).
        self.param = param
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.register_buffer('sqrt_ac', ac.sqrt().float(), persistent=False)
        self.register_buffer('sqrt_1mac', (1 - ac).sqrt().float(), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(128, e), nn.SiLU(), nn.Linear(e, e))
        self.ctx_in = nn.Sequential(nn.LayerNorm(ctx_dim), nn.Linear(ctx_dim, dc))
        self.pool_q = nn.Parameter(torch.randn(1, 1, dc) * 0.02)
        self.pool_out = nn.Linear(dc, e)
        # The last position of a causal encoder's output has seen the whole caption (CLIP pads after EOS), so it is a
        # summary the UNet can read without knowing where EOS is. Zero-initialised: a warm start begins unchanged.
        self.last_tok = nn.Linear(ctx_dim, e) if last_tok else None
        if last_tok:
            nn.init.zeros_(self.last_tok.weight)
            nn.init.zeros_(self.last_tok.bias)
        if self.xl:
            self.add_text = nn.Linear(xl_pooled_dim, e)
            self.add_time = nn.Linear(6 * 32, e)
        self.inp = nn.Conv2d(16 + 2, c1, 3, padding=1)
        self.spatial = spatial
        if spatial:
            self.sp1, self.sp2 = SpatialFiLM(e, c1), SpatialFiLM(e, c2)
        self.d1 = ResBlock(c1, c1, e)
        self.down = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.m1 = ResBlock(c2, c2, e)
        self.a1 = Attn(c2, dc)
        self.m2 = ResBlock(c2, c2, e)
        self.a2 = Attn(c2, dc)
        self.m3 = ResBlock(c2, c2, e)
        self.up = nn.Conv2d(c2, c1, 3, padding=1)
        self.u1 = ResBlock(2 * c1, c1, e)
        self.out_n = nn.GroupNorm(8, c1)
        self.out = nn.Conv2d(c1, 16, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        B = sample.shape[0]
        emb = self.t_mlp(timestep_embedding(timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep, 128))
        ctx = self.ctx_in(encoder_hidden_states)
        pa = ((self.pool_q @ ctx.transpose(1, 2)) * (ctx.shape[-1] ** -0.5)).softmax(-1) @ ctx
        emb = emb + self.pool_out(pa[:, 0])
        if self.last_tok is not None:
            emb = emb + self.last_tok(encoder_hidden_states[:, -1])
        if self.xl:
            emb = emb + self.add_text(text_embeds)
            emb = emb + self.add_time(timestep_embedding(time_ids.reshape(-1), 32).reshape(B, 6 * 32))
        x = F.pixel_unshuffle(sample, 2)
        h, w = x.shape[-2], x.shape[-1]
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
        coords = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)])[None].expand(B, 2, h, w)
        x = self.inp(torch.cat([x, coords], dim=1))
        if self.spatial:
            x = self.sp1(x, emb)
        s1 = self.d1(x, emb)
        y = self.down(s1)
        if self.spatial:
            y = self.sp2(y, emb)
        y = self.a1(self.m1(y, emb), ctx)
        y = self.a2(self.m2(y, emb), ctx)
        y = self.m3(y, emb)
        y = F.interpolate(y, scale_factor=2.0, mode='nearest')
        y = self.up(y)
        y = self.u1(torch.cat([y, s1], dim=1), emb)
        y = F.pixel_shuffle(self.out(F.silu(self.out_n(y))), 2)
        if self.param == 'v':
            ti = timestep.reshape(-1).expand(B).long().clamp(0, 999)
            y = self.sqrt_1mac[ti][:, None, None, None] * sample + self.sqrt_ac[ti][:, None, None, None] * y
        return y


def nparams(m):
    return sum(p.numel() for p in m.parameters())
