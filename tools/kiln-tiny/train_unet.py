"""Stage 2: joint training of the SD (kiln-tiny) and SDXL (kiln-tiny-xl) text encoders + UNets on the
precomputed VAE latents (ckpt/latents.pt). The two UNets share their body; each has its own
conditioning interface (SD: te last_hidden_state; XL: concat(te1 hidden_states[-2], te2 hidden_states[-2])
+ pooled text_embeds + time_ids). te1 of XL = the SD text encoder (shared weights).
Epsilon output (v-parametrised body), SD scaled_linear betas (0.00085..0.012, 1000 steps), unweighted v loss
(--weighting minsnr for min-SNR-5), training-only text-attribute heads, 10% caption dropout: SD uses the
encoding of "", XL uses zeros (force_zeros_for_empty_prompt)."""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa
import pipeline as P  # noqa
from models import TextEncoder, UNet, load_decoder, nparams  # noqa

BODY = ['t_mlp', 'inp', 'd1', 'down', 'm1', 'a1', 'm2', 'a2', 'm3', 'up', 'u1', 'out_n', 'out']
CFG = dict(d=128, layers=2, d2=128, layers2=2, proj2=128, c1=64, c2=128, dc=128, e=256, param='v',
           last_tok=True, aux=True, spatial=True)
N_AUX = sum(n + 1 for n in world.ATTR_CLASSES.values())  # each attribute's classes + 'not stated'


def build(cfg=CFG):
    lut, nrows = world.build_lut()
    te = TextEncoder(lut, nrows, d=cfg['d'], layers=cfg['layers'])
    te2 = TextEncoder(lut, nrows, d=cfg['d2'], layers=cfg['layers2'], proj_dim=cfg['proj2'])
    par = cfg.get('param', 'eps')
    lt = cfg.get('last_tok', False)
    sp = cfg.get('spatial', False)
    unet = UNet(cfg['d'], cfg['c1'], cfg['c2'], cfg['dc'], cfg['e'], param=par, last_tok=lt, spatial=sp)
    unet_xl = UNet(cfg['d'] + cfg['d2'], cfg['c1'], cfg['c2'], cfg['dc'], cfg['e'], xl_pooled_dim=cfg['proj2'], param=par,
                   last_tok=lt, spatial=sp)
    for n in BODY + (['sp1', 'sp2'] if sp else []):
        setattr(unet_xl, n, getattr(unet, n))
    parts = dict(te=te, te2=te2, unet=unet, unet_xl=unet_xl)
    if cfg.get('aux'):
        # Training-only heads (not exported): read every stated attribute back from the text summaries the UNets
        # use (SD: last position of te's output; XL: te2's pooled text_embeds). A direct signal that makes the
        # text features carry and bind the attributes long before the diffusion loss alone would.
        parts['aux'] = torch.nn.ModuleDict(dict(sd=torch.nn.Linear(cfg['d'], N_AUX),
                                                xl=torch.nn.Linear(cfg['proj2'], N_AUX)))
    return torch.nn.ModuleDict(parts)


def aux_loss(logits, labels):
    """Sum of per-attribute cross-entropies; labels [n, 5] from world.attribute_labels."""
    total, o = 0.0, 0
    for k, n in enumerate(world.ATTR_CLASSES.values()):
        total = total + torch.nn.functional.cross_entropy(logits[:, o:o + n + 1], labels[:, k])
        o += n + 1
    return total


def evaluate(m, dec, sf, n=40, seed=4321, method='ddim', which=('sd', 'xl')):
    items = world.eval_set(n, seed)
    caps = [c for c, _, _ in items]
    seeds = list(range(seed, seed + n))
    res = {}
    with torch.no_grad():
        if 'sd' in which:
            cond = dict(encoder_hidden_states=P.encode_sd(m['te'], caps))
            unc = dict(encoder_hidden_states=P.encode_sd(m['te'], [''] * n))
            lat = P.sample(m['unet'], cond, unc, seeds, method=method)
            res['sd'] = world.score_set(P.decode(dec, lat, sf), items)
        if 'xl' in which:
            ctx, pooled = P.encode_xl(m['te'], m['te2'], caps)
            tid = torch.tensor([P.TIME_IDS] * n)
            cond = dict(encoder_hidden_states=ctx, text_embeds=pooled, time_ids=tid)
            unc = dict(encoder_hidden_states=torch.zeros_like(ctx), text_embeds=torch.zeros_like(pooled), time_ids=tid)
            lat = P.sample(m['unet_xl'], cond, unc, seeds, method=method)
            res['xl'] = world.score_set(P.decode(dec, lat, sf), items)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=100000)
    ap.add_argument('--minutes', type=float, default=60, help='stop after this wall time')
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--ema', type=float, default=0.998)
    ap.add_argument('--eval_every', type=int, default=400)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--resume', default='')
    ap.add_argument('--weighting', default='none', choices=['none', 'minsnr'],
                    help="v-loss weighting; 'none' keeps the high-noise steps (where colours/layout are decided) at full weight")
    ap.add_argument('--init', default='', help='warm start: model weights from this checkpoint')
    ap.add_argument('--init_skip', default='.out.', help='comma list of key prefixes/substrings re-initialised on --init')
    ap.add_argument('--clip', type=float, default=100.0)
    ap.add_argument('--aux_weight', type=float, default=0.05, help='weight of the text-attribute loss (0 = off)')
    ap.add_argument('--p_pos', type=float, default=0.5, help='share of training captions that state the position')
    ap.add_argument('--decay', action='store_true', help='cosine learning-rate decay to 5%% over the run: --steps or --minutes, whichever ends first')
    ap.add_argument('--ckpt', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ckpt'))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    L = torch.load(os.path.join(args.ckpt, 'latents.pt'))
    sf = L['scaling_factor']
    lat = L['latents'] * sf
    dec = load_decoder(torch.load(os.path.join(args.ckpt, 'vae.pt')))
    dec.eval()

    m = build()
    ema = copy.deepcopy(m)
    for p in ema.parameters():
        p.requires_grad_(False)
    params = list({id(p): p for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step0 = 0
    if args.resume:
        ck = torch.load(args.resume)
        m.load_state_dict(ck['model'])
        ema.load_state_dict(ck['ema'])
        opt.load_state_dict(ck['opt'])
        step0 = ck['step']
    elif args.init:
        skip = args.init_skip.split(',')
        sd = {k: v for k, v in torch.load(args.init)['model'].items()
              if not any(k.startswith(p) or p in k for p in skip if p)}
        print('warm start from', args.init, m.load_state_dict(sd, strict=False), flush=True)
        ema.load_state_dict(m.state_dict())
    print('params te', nparams(m['te']), 'te2', nparams(m['te2']), 'unet', nparams(m['unet']),
          'unet_xl', nparams(m['unet_xl']), 'scaling_factor', sf, flush=True)

    ac = P.ALPHAS_CUMPROD.float()
    snr = ac / (1 - ac)
    # min-SNR-5 weighting; for v targets the weight is min(snr, 5) / (snr + 1)
    w_t = torch.clamp(snr, max=5.0) / (snr + 1 if CFG['param'] == 'v' else snr)
    if args.weighting == 'none':
        w_t = torch.ones_like(w_t)
    tid = torch.tensor([P.TIME_IDS] * args.batch)
    B, H = args.batch, args.batch // 2
    t0 = time.time()
    ema_pairs = list(zip(ema.parameters(), m.parameters()))
    run = 0.0
    step = step0
    for step in range(step0, args.steps):
        idx, caps, masks = world.sample_batch(rng, B, p_drop=0.1, with_masks=True, p_pos=args.p_pos)
        labels = torch.from_numpy(world.attribute_labels(idx, masks))
        x0 = lat[torch.from_numpy(idx)]
        ids1 = P.ids_tensor(caps, world.EOS)
        ids2 = P.ids_tensor(caps[H:], 0)
        t = torch.randint(0, 1000, (B,))
        noise = torch.randn_like(x0)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        last, _, hs1 = m['te'](ids1)
        eps_sd = m['unet'](xt[:H], t[:H], last[:H])
        _, pooled, hs2 = m['te2'](ids2)
        ctx = torch.cat([hs1[-2][H:], hs2[-2]], dim=-1)
        keep = torch.tensor([0.0 if c == '' else 1.0 for c in caps[H:]])
        ctx = ctx * keep[:, None, None]
        pooled = pooled * keep[:, None]
        eps_xl = m['unet_xl'](xt[H:], t[H:], ctx, pooled, tid[H:])
        eps = torch.cat([eps_sd, eps_xl])
        if CFG['param'] == 'v':  # compare in v space: v_hat = (eps_hat - sqrt(1-a) x_t) / sqrt(a)
            v_hat = (eps - (1 - a).sqrt() * xt) / a.sqrt()
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
            err = v_hat - target
        else:
            err = eps - noise
        loss = (w_t[t] * err.pow(2).mean(dim=(1, 2, 3))).mean()
        if 'aux' in m and args.aux_weight > 0:
            la = aux_loss(m['aux']['sd'](last[:H, -1]), labels[:H]) + aux_loss(m['aux']['xl'](pooled), labels[H:])
            loss = loss + args.aux_weight * la
        lr = args.lr * min(1.0, (step + 1) / 100)
        if args.decay:
            frac = min(1.0, max((step - step0) / max(1, args.steps - step0), (time.time() - t0) / (60 * args.minutes)))
            lr *= 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac))
        for g in opt.param_groups:
            g['lr'] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in ema_pairs:
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        run = 0.98 * run + 0.02 * loss.item() if step > step0 else loss.item()
        el = time.time() - t0
        if step % 25 == 0:
            print(f'step {step} loss {run:.4f} {el:.0f}s', flush=True)
        done = el > args.minutes * 60 or step == args.steps - 1
        if (step + 1) % 200 == 0 or done:
            ck = dict(model=m.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step + 1,
                      cfg=CFG, scaling_factor=sf)
            torch.save(ck, os.path.join(args.ckpt, 'unet.pt.tmp'))
            os.replace(os.path.join(args.ckpt, 'unet.pt.tmp'), os.path.join(args.ckpt, 'unet.pt'))
        if (step + 1) % args.eval_every == 0 or done:
            te0 = time.time()
            ema.eval()
            r = evaluate(ema, dec, sf)
            print(f'EVAL step {step + 1}: {json.dumps(r)} ({time.time() - te0:.0f}s)', flush=True)
            t0 += time.time() - te0
        if done:
            break
    print('done', step + 1, flush=True)


if __name__ == '__main__':
    main()
