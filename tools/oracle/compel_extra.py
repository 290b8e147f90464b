"""compel's outputs for what compel-golden leaves out, on the same tiny encoders:
- Kiln's two deliberate exceptions written in compel's own syntax (`photorealistic(1.5)` is
  `(photorealistic)1.5` to Kiln, A1111's `(ball:1.2)` is `(ball)1.2`);
- DownweightMode.REMOVE, what Kiln does for text encoders without an attention_mask input.

Run in the oracle environment (../../../shared/oracle/README.md) with compel v2.3.1's src/ on PYTHONPATH:
  source ../shared/oracle/env.sh SRC_DIR; PYTHONPATH=$PYTHONPATH:COMPEL_SRC \
  /usr/bin/python3 tools/oracle/compel_extra.py ../shared/data/compel-golden test/engine/fixtures
The golden tokenizer folders hold configs only; their vocabulary is models/.clip-tokenizer.
This machine's torch differs from the golden set's by up to ~1e-6 (CPU kernels); the drift is recorded.
"""
import json, os, shutil, sys, tempfile
os.environ['OPENBLAS_NUM_THREADS'] = '1'
GOLDEN, OUT = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'shared', 'oracle'))
import oracle_compat
oracle_compat.patch_added_token()
import torch
torch.set_num_threads(1)
from transformers import CLIPTokenizer, CLIPTextModel, CLIPTextModelWithProjection
from compel import Compel, ReturnedEmbeddingsType, DownweightMode
from safetensors.torch import load_file, save_file

vocab = os.path.join(HERE, '..', 'data', 'clip-tokenizer')
toks = []
with tempfile.TemporaryDirectory() as tmp:
    for name in ['tokenizer', 'tokenizer_2']:
        d = os.path.join(tmp, name)
        shutil.copytree(os.path.join(GOLDEN, name), d)
        for f in ['vocab.json', 'merges.txt']:
            shutil.copy(os.path.join(vocab, f), d)
        toks.append(CLIPTokenizer.from_pretrained(d))
tok, tok2 = toks
te = CLIPTextModel.from_pretrained(os.path.join(GOLDEN, 'text_encoder'), attn_implementation='eager').eval()
te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(GOLDEN, 'text_encoder_2'), attn_implementation='eager').eval()
golden = load_file(os.path.join(GOLDEN, 'outputs.safetensors'))

def sd(prompt, **kw):
    with torch.no_grad():
        return Compel(tokenizer=tok, text_encoder=te, **kw)(prompt)

def xl(prompt, **kw):
    with torch.no_grad():
        return Compel(tokenizer=[tok, tok2], text_encoder=[te, te2], requires_pooled=[False, True],
                      returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, **kw)(prompt)

be = 'a photorealistic(1.5) image of a cat playing with a (ball)0.5 in a (forest)1.0'
c, p = xl(be)
drift = {'sd15.be_example.cond': (sd(be) - golden['sd15.be_example.cond']).abs().max().item(),
         'sdxl.be_example.cond': (c - golden['sdxl.be_example.cond']).abs().max().item(),
         'sdxl.be_example.pooled': (p - golden['sdxl.be_example.pooled']).abs().max().item()}
assert max(drift.values()) < 1e-5, drift

cases = json.load(open(os.path.join(GOLDEN, 'cases.json')))
prompt_of = {c['id']: c['prompt'] for c in cases['cases'] if 'prompt' in c}
out, meta = {}, {'exceptions': {}, 'remove': {}}
for k, prompt in {'be_example': 'a (photorealistic)1.5 image of a cat playing with a (ball)0.5 in a (forest)1.0',
                  'a1111': 'a cat playing with a (ball)1.2'}.items():
    out[f'sd15.{k}.cond'] = sd(prompt).contiguous()
    out[f'sdxl.{k}.cond'] = xl(prompt)[0].contiguous()
    meta['exceptions'][k] = prompt
for k in ['two_down', 'zero', 'straddle_trunc', 'long_chunked', 'straddle_chunked']:
    chunked = k.endswith('_chunked')
    kw = {'downweight_mode': DownweightMode.REMOVE, **({'truncate_long_prompts': False} if chunked else {})}
    entry = {'prompt': prompt_of[k], 'truncate_long_prompts': not chunked}
    try:
        out[f'sdxl.remove.{k}.cond'] = xl(prompt_of[k], **kw)[0].contiguous()
    except Exception as e:  # compel cannot blend a pass that chunks differently
        entry['compel_raises'] = f'{type(e).__name__}: {str(e)[:200]}'
    meta['remove'][k] = entry
save_file(out, os.path.join(OUT, 'compel-extra.safetensors'))
meta.update(drift_from_golden_on_this_machine=drift, shapes={k: list(v.shape) for k, v in out.items()})
with open(os.path.join(OUT, 'compel-extra.json'), 'w') as f:
    json.dump(meta, f, indent=1)
    f.write('\n')
print(json.dumps(meta['shapes']))
