"""Stage 1b: fine-tune only the VAE decoder on the frozen encoder's latents (ckpt/latents.pt), so the
latents (and scaling_factor) used by the UNet stay unchanged. Sharpens edges/apexes."""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa
from models import VAEDecoder  # noqa

ap = argparse.ArgumentParser()
ap.add_argument('--steps', type=int, default=2500)
ap.add_argument('--batch', type=int, default=32)
ap.add_argument('--crop', type=int, default=64)
ap.add_argument('--lr', type=float, default=1e-3)
ap.add_argument('--noise', type=float, default=0.02, help='latent noise (fraction of latent std)')
ap.add_argument('--threads', type=int, default=2)
ap.add_argument('--seed', type=int, default=1)
ap.add_argument('--extra', action='store_true', help='add the 2x/4x residual blocks (VAEDecoder(extra=True))')
ap.add_argument('--init', default='vae.pt', help='decoder weights to start from (in --ckpt)')
ap.add_argument('--tri', type=float, default=0.0, help='fraction of each batch drawn from small-triangle images')
ap.add_argument('--ckpt', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ckpt'))
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
rng = np.random.default_rng(args.seed)
imgs = world.render_all()
vae = torch.load(os.path.join(args.ckpt, args.init))
lat = torch.load(os.path.join(args.ckpt, 'latents.pt'))['latents']
zstd = lat.std().item()
dec = VAEDecoder(extra=args.extra)
print('load', dec.load_state_dict(vae['dec'], strict=False), flush=True)
small_tri = np.array([i for i, a in enumerate(world.ALL_ATTRS) if a[2] == 2 and a[3] == 0])
opt = torch.optim.Adam(dec.parameters(), lr=args.lr)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
t0 = time.time()
c, lc = args.crop, args.crop // 8
for step in range(args.steps):
    idx = rng.integers(0, len(imgs), args.batch)
    n_tri = int(round(args.tri * args.batch))
    if n_tri:
        idx[:n_tri] = rng.choice(small_tri, n_tri)
    ys = rng.integers(0, 32 - lc + 1, args.batch)
    xs = rng.integers(0, 32 - lc + 1, args.batch)
    x = torch.from_numpy(np.stack([imgs[i, y * 8:y * 8 + c, xx * 8:xx * 8 + c] for i, y, xx in zip(idx, ys, xs)]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    z = torch.stack([lat[i, :, y:y + lc, xx:xx + lc] for i, y, xx in zip(idx, ys, xs)])
    z = z + args.noise * zstd * torch.randn_like(z)
    rec = dec(z)
    loss = (rec - x).abs().mean() + 0.5 * F.mse_loss(rec, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 100 == 0 or step == args.steps - 1:
        print(f'step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s', flush=True)
    if step % 500 == 499 or step == args.steps - 1:
        torch.save({'enc': vae['enc'], 'dec': dec.state_dict(), 'dec_extra': args.extra}, os.path.join(args.ckpt, 'vae_ft.pt'))
dec.eval()
sel = list(range(0, 1680, 7))
with torch.no_grad():
    rec = torch.cat([dec(lat[sel[i:i + 40]]) for i in range(0, len(sel), 40)])
rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
items = [('', dict(bg=True, fg=True, shape=True, size=True, pos=True), world.ALL_ATTRS[i]) for i in sel]
print('scorer on reconstructions:', world.score_set(list(rec), items), f'{time.time() - t0:.0f}s', flush=True)
