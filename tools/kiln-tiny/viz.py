"""Quick look at the current checkpoint: samples for a few eval captions -> samples/viz_<which>.png"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa
from train_unet import build, evaluate  # noqa
import pipeline as P  # noqa
from models import load_decoder  # noqa
from PIL import Image

torch.set_num_threads(int(os.environ.get('THREADS', '1')))
ck = torch.load('ckpt/unet.pt')
m = build(ck['cfg'])
m.load_state_dict(ck['ema'])
m.eval()
dec = load_decoder(torch.load(sys.argv[1] if len(sys.argv) > 1 else 'ckpt/vae.pt'))
dec.eval()
sf = ck['scaling_factor']
n = 8
items = world.eval_set(n, 4321)
caps = [c for c, _, _ in items]
print(ck['step'], caps)
with torch.no_grad():
    cond = dict(encoder_hidden_states=P.encode_sd(m['te'], caps))
    unc = dict(encoder_hidden_states=P.encode_sd(m['te'], [''] * n))
    lat = P.sample(m['unet'], cond, unc, list(range(4321, 4321 + n)))
imgs = P.decode(dec, lat, sf)
os.makedirs('samples', exist_ok=True)
Image.fromarray(np.concatenate(imgs, 1)).resize((8 * 128, 128)).save('samples/viz_sd.png')
for im, it in zip(imgs, items):
    print(it[0], world.score_image(im), it[2])
