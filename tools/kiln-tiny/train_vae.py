"""Stage 1: train the KL autoencoder (8x down, 4 latent channels) on 64x64 crops of world images
(fully convolutional, so it runs at any size), then encode all 1680 world images and measure
scaling_factor = 1/std(latents).  Output: ckpt/vae.pt, ckpt/latents.pt"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa
from models import VAEEncoder, VAEDecoder, nparams  # noqa

ap = argparse.ArgumentParser()
ap.add_argument('--steps', type=int, default=1500)
ap.add_argument('--batch', type=int, default=32)
ap.add_argument('--crop', type=int, default=64)
ap.add_argument('--lr', type=float, default=2e-3)
ap.add_argument('--kl', type=float, default=1e-4)
ap.add_argument('--threads', type=int, default=2)
ap.add_argument('--seed', type=int, default=0)
ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ckpt'))
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
rng = np.random.default_rng(args.seed)
os.makedirs(args.out, exist_ok=True)

t0 = time.time()
imgs = world.render_all()  # [1680,256,256,3] uint8
print('rendered', imgs.shape, f'{time.time() - t0:.1f}s', flush=True)
enc, dec = VAEEncoder(), VAEDecoder()
print('params enc', nparams(enc), 'dec', nparams(dec), flush=True)
opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=args.lr)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)


def to_t(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


t0 = time.time()
for step in range(args.steps):
    idx = rng.integers(0, len(imgs), args.batch)
    c = args.crop
    ys = rng.integers(0, (256 - c) // 8 + 1, args.batch) * 8
    xs = rng.integers(0, (256 - c) // 8 + 1, args.batch) * 8
    x = to_t(np.stack([imgs[i, y:y + c, xx:xx + c] for i, y, xx in zip(idx, ys, xs)]))
    mean, logvar = enc(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    z = z + 0.05 * mean.detach().std() * torch.randn_like(z)  # robustness to small latent errors
    rec = dec(z)
    l1 = (rec - x).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = l1 + 0.5 * F.mse_loss(rec, x) + args.kl * kl
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 50 == 0 or step == args.steps - 1:
        print(f'step {step} l1 {l1.item():.4f} kl {kl.item():.2f} zstd {mean.std().item():.3f} '
              f'{time.time() - t0:.0f}s', flush=True)
    if step % 500 == 499:
        torch.save({'enc': enc.state_dict(), 'dec': dec.state_dict()}, os.path.join(args.out, 'vae.pt'))

torch.save({'enc': enc.state_dict(), 'dec': dec.state_dict()}, os.path.join(args.out, 'vae.pt'))
enc.eval()
dec.eval()
lat = []
errs = []
with torch.no_grad():
    for i in range(0, len(imgs), 40):
        x = to_t(imgs[i:i + 40])
        m, _ = enc(x)
        lat.append(m)
        errs.append((dec(m) - x).abs().mean().item())
lat = torch.cat(lat)
std = lat.std().item()
print(f'latents {tuple(lat.shape)} mean {lat.mean().item():.4f} std {std:.4f} scaling_factor {1 / std:.5f} '
      f'full-image recon L1 {np.mean(errs):.4f}', flush=True)
torch.save({'latents': lat, 'scaling_factor': 1.0 / std}, os.path.join(args.out, 'latents.pt'))
# recon accuracy with the scorer on 100 images
sel = rng.integers(0, len(imgs), 100)
with torch.no_grad():
    rec = dec(lat[sel])
rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
items = [('', dict(bg=True, fg=True, shape=True, size=True, pos=True), world.ALL_ATTRS[i]) for i in sel]
print('scorer on reconstructions:', world.score_set(list(rec), items), f'total {time.time() - t0:.0f}s', flush=True)
