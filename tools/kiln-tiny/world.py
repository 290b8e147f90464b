"""Kiln-tiny synthetic world: renderer, caption sampler, CLIP-exact tokenizer for the world words,
and the pixel scorer used for training-time evaluation.

256x256 RGB, solid background + one filled shape (circle / square / upright equilateral triangle),
size small (25% of width) or large (55%), position center/left/right/top/bottom (bbox centre at
50% or 25%/75% along one axis). Mild anti-aliasing (2x2 supersampling).
"""
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = os.path.join(HERE, '..', '..', 'models', '.clip-tokenizer', 'vocab.json')

COLORS = {
    'red': (220, 40, 40), 'green': (40, 180, 70), 'blue': (40, 80, 220), 'yellow': (240, 210, 40),
    'orange': (245, 140, 30), 'purple': (140, 60, 190), 'white': (245, 245, 245), 'black': (20, 20, 20),
}
COLOR_NAMES = list(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
SHAPES = ['circle', 'square', 'triangle']
SIZES = {'small': 0.25, 'large': 0.55}
SIZE_NAMES = list(SIZES)
POSITIONS = {'center': (0.5, 0.5), 'left': (0.25, 0.5), 'right': (0.75, 0.5), 'top': (0.5, 0.25), 'bottom': (0.5, 0.75)}
POS_NAMES = list(POSITIONS)

# Every distinct image of the world: (bg, fg, shape, size, pos) with fg != bg -> 8*7*3*2*5 = 1680
ALL_ATTRS = [(b, f, s, z, p) for b in range(8) for f in range(8) if f != b
             for s in range(3) for z in range(2) for p in range(5)]
ATTR_INDEX = {a: i for i, a in enumerate(ALL_ATTRS)}


def render(bg, fg, shape, size, pos, res=256, ss=2):
    """bg, fg: colour indices; shape: 0..2; size: 0..1; pos: 0..4. Returns uint8 [res,res,3]."""
    n = res * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx = (xx + 0.5) / n
    yy = (yy + 0.5) / n
    cx, cy = POSITIONS[POS_NAMES[pos]]
    s = SIZES[SIZE_NAMES[size]]
    name = SHAPES[shape]
    if name == 'circle':
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= (s / 2) ** 2
    elif name == 'square':
        m = (np.abs(xx - cx) <= s / 2) & (np.abs(yy - cy) <= s / 2)
    else:  # upright equilateral triangle, side s, bbox centred at (cx, cy)
        h = s * np.sqrt(3) / 2
        top, bot = cy - h / 2, cy + h / 2
        t = (yy - top) / h  # 0 at apex, 1 at base
        m = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * s / 2)
    m = m.astype(np.float32)
    if ss > 1:
        m = m.reshape(res, ss, res, ss).mean(axis=(1, 3))
    img = PALETTE[bg][None, None] * (1 - m[..., None]) + PALETTE[fg][None, None] * m[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_all(res=256):
    return np.stack([render(*a, res=res) for a in ALL_ATTRS])


# ----------------------------------------------------------------------------- captions
def make_caption(rng, attrs, p_size=0.5, p_pos=0.5):
    """Returns (caption, mask) where mask tells which attributes the caption states:
    dict bg/fg/shape/size/pos -> bool. The image for the caption is `attrs` (full tuple); attributes
    the caption leaves out are random by construction (attrs is sampled uniformly)."""
    bg, fg, shape, size, pos = attrs
    c = lambda i: COLOR_NAMES[i]
    art = lambda w: ('an' if (w[0] in 'aeiou' and rng.random() < 0.5) else 'a')
    r = rng.random()
    use_size = rng.random() < p_size
    use_pos = rng.random() < p_pos
    if r < 0.60:      # a [small|large] <color> <shape> [at the <position>] on a <color> background
        words = []
        if use_size:
            words.append(SIZE_NAMES[size])
        words += [c(fg), SHAPES[shape]]
        first = art(words[0])
        cap = first + ' ' + ' '.join(words)
        if use_pos:
            cap += ' at the ' + POS_NAMES[pos]
        cap += ' on ' + art(c(bg)) + ' ' + c(bg) + ' background'
        mask = dict(bg=True, fg=True, shape=True, size=use_size, pos=use_pos)
    elif r < 0.72:    # <color> <shape>   (optionally with size / position)
        cap = (SIZE_NAMES[size] + ' ' if use_size else '') + c(fg) + ' ' + SHAPES[shape]
        if use_pos:
            cap += ' at the ' + POS_NAMES[pos]
        mask = dict(bg=False, fg=True, shape=True, size=use_size, pos=use_pos)
    elif r < 0.86:    # a <shape> that is <color>, <color> background
        sz = (SIZE_NAMES[size] + ' ') if use_size else ''
        cap = 'a ' + sz + SHAPES[shape] + ' that is ' + c(fg) + ', ' + c(bg) + ' background'
        if use_pos:
            cap = 'a ' + sz + SHAPES[shape] + ' at the ' + POS_NAMES[pos] + ' that is ' + c(fg) + ', ' + c(bg) + ' background'
        mask = dict(bg=True, fg=True, shape=True, size=use_size, pos=use_pos)
    else:             # a [size] <color> <shape> [at the <pos>]   (no background)
        cap = 'a ' + ((SIZE_NAMES[size] + ' ') if use_size else '') + c(fg) + ' ' + SHAPES[shape]
        if use_pos:
            cap += ' at the ' + POS_NAMES[pos]
        mask = dict(bg=False, fg=True, shape=True, size=use_size, pos=use_pos)
    return cap, mask


def sample_batch(rng, n, p_drop=0.1, with_masks=False, p_pos=0.5):
    """Returns (image indices [n], captions list[, masks]). Empty caption with probability p_drop
    (its mask states nothing)."""
    idx = rng.integers(0, len(ALL_ATTRS), size=n)
    caps, masks = [], []
    for i in idx:
        if rng.random() < p_drop:
            caps.append('')
            masks.append(dict(bg=False, fg=False, shape=False, size=False, pos=False))
        else:
            cap, mask = make_caption(rng, ALL_ATTRS[i], p_pos=p_pos)
            caps.append(cap)
            masks.append(mask)
    return (idx, caps, masks) if with_masks else (idx, caps)


ATTR_CLASSES = dict(bg=len(COLOR_NAMES), fg=len(COLOR_NAMES), shape=len(SHAPES), size=len(SIZE_NAMES), pos=len(POS_NAMES))


def attribute_labels(idx, masks):
    """[n, 5] class per attribute (bg, fg, shape, size, pos); the extra last class = 'caption does not say'."""
    out = np.zeros((len(idx), 5), dtype=np.int64)
    for r, (i, mask) in enumerate(zip(idx, masks)):
        for k, (name, n_cls) in enumerate(ATTR_CLASSES.items()):
            out[r, k] = ALL_ATTRS[i][k] if mask[name] else n_cls
    return out


def eval_set(n=200, seed=1234):
    """Fixed eval list: (caption, mask, attrs)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = ALL_ATTRS[rng.integers(len(ALL_ATTRS))]
        cap, mask = make_caption(rng, a)
        out.append((cap, mask, a))
    return out


# ----------------------------------------------------------------------------- tokenizer
BOS, EOS = 49406, 49407
WORLD_WORDS = ['a', 'an', 'small', 'large', *COLOR_NAMES, *SHAPES, 'at', 'the', 'center', 'centre', 'left',
               'right', 'top', 'bottom', 'on', 'background', 'that', 'is', ',']
_vocab = None


def vocab():
    global _vocab
    if _vocab is None:
        _vocab = json.load(open(VOCAB))
    return _vocab


def world_token_ids():
    v = vocab()
    ids = {}
    for w in WORLD_WORDS:
        ids[w] = v[w + '</w>']   # each world word is a single BPE token (checked: KeyError otherwise)
    return ids


_PAT = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


def tokenize(text, pad_id=EOS, length=77):
    """CLIP tokenization for texts made of world words (single-token words). Unknown words -> raises."""
    ids_map = world_token_ids()
    text = re.sub(r'\s+', ' ', text.strip().lower())
    toks = [ids_map[w] for w in _PAT.findall(text)]
    ids = [BOS] + toks[:length - 2] + [EOS]
    return ids + [pad_id] * (length - len(ids))


def build_lut():
    """Maps the 49408 CLIP ids to small rows: 0 = unknown, 1 = BOS, 2 = EOS, 3 = '!' (id 0, pad of
    tokenizer_2), then the world words (centre shares center's row)."""
    lut = np.zeros(49408, dtype=np.uint8)
    lut[BOS] = 1
    lut[EOS] = 2
    lut[0] = 3
    ids = world_token_ids()
    row = 4
    rows = {}
    for w in WORLD_WORDS:
        if w == 'centre':
            continue
        rows[w] = row
        lut[ids[w]] = row
        row += 1
    lut[ids['centre']] = rows['center']
    return lut, row


# ----------------------------------------------------------------------------- scorer
def _nearest(rgb):
    d = ((PALETTE[None] - np.asarray(rgb, np.float32)[:, None] if np.ndim(rgb) > 1 else PALETTE - np.asarray(rgb, np.float32)) ** 2)
    return np.argmin(d.sum(-1), axis=-1)


def score_image(img):
    """img uint8 [H,W,3]. Returns dict(bg, fg, shape, size, pos) of predicted indices (None if no fg)."""
    img = img.astype(np.float32)
    H, W, _ = img.shape
    b = 8
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    bg = int(_nearest(np.median(border, axis=0)))
    lab = np.argmin(((img[..., None, :] - PALETTE[None, None]) ** 2).sum(-1), axis=-1)
    nonbg = lab != bg
    out = dict(bg=bg, fg=None, shape=None, size=None, pos=None)
    if nonbg.sum() == 0:
        return out
    comp = _largest_component(nonbg)
    ys, xs = np.nonzero(comp)
    fg = int(_nearest(np.median(img[ys, xs], axis=0)))
    h = ys.max() - ys.min() + 1
    w = xs.max() - xs.min() + 1
    fill = len(ys) / float(h * w)
    shape = 0 if 0.70 <= fill <= 0.86 else 1 if fill >= 0.90 else 2 if 0.40 <= fill <= 0.60 else -1
    size = 0 if max(h, w) / W < 0.40 else 1
    cx, cy = xs.mean() / W, ys.mean() / H
    if abs(cx - 0.5) < 0.125 and abs(cy - 0.5) < 0.125:
        pos = 0
    elif abs(cx - 0.5) >= abs(cy - 0.5):
        pos = 1 if cx < 0.5 else 2
    else:
        pos = 3 if cy < 0.5 else 4
    out.update(fg=fg, shape=shape, size=size, pos=pos)
    return out


def _largest_component(mask):
    from scipy import ndimage  # noqa
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == counts.argmax()


def score_set(images, items):
    """images: list of uint8 arrays; items: list of (caption, mask, attrs). Returns per-attribute accuracy."""
    keys = ['bg', 'fg', 'shape', 'size', 'pos']
    hit = {k: 0 for k in keys}
    tot = {k: 0 for k in keys}
    for img, (_, mask, attrs) in zip(images, items):
        s = score_image(img)
        for i, k in enumerate(keys):
            if mask[k]:
                tot[k] += 1
                hit[k] += int(s[k] == attrs[i])
    return {k: (hit[k] / tot[k] if tot[k] else None) for k in keys}


if __name__ == '__main__':
    rng = np.random.default_rng(0)
    for _ in range(8):
        a = ALL_ATTRS[rng.integers(len(ALL_ATTRS))]
        cap, m = make_caption(rng, a)
        print(cap, '|', tokenize(cap)[:14])
    items = eval_set(50)
    imgs = [render(*a) for _, _, a in items]
    print('scorer on ground truth:', score_set(imgs, items))
