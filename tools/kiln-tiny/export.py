"""Stage 3: export ckpt/{vae,unet}.pt (EMA weights) to models/kiln-tiny (SD 1.x layout) and
models/kiln-tiny-xl (SDXL layout). ONNX opset 17, fp32 graphs whose float initializers are then
stored as fp16 followed by Cast->fp32 (fp32 I/O and fp32 compute)."""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, TensorProto

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import world  # noqa
from models import VAEEncoder, load_decoder, nparams  # noqa
from train_unet import build  # noqa

ROOT = os.path.abspath(os.path.join(HERE, '..', '..'))
OPSET = 17


class TE(torch.nn.Module):
    def __init__(self, te, xl_outputs=False, with_proj=False):
        super().__init__()
        self.te, self.xl_outputs, self.with_proj = te, xl_outputs, with_proj

    def forward(self, input_ids):
        last, pooled, hs = self.te(input_ids)
        if self.with_proj:  # CLIPTextModelWithProjection order: text_embeds, last_hidden_state, hidden_states.*
            return (pooled, last, *hs)
        if self.xl_outputs:
            return (last, pooled, *hs)
        return last, pooled


class UNetSD(torch.nn.Module):
    def __init__(self, u):
        super().__init__()
        self.u = u

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.u(sample, timestep.reshape(-1).expand(sample.shape[0]), encoder_hidden_states)


class UNetXL(torch.nn.Module):
    def __init__(self, u):
        super().__init__()
        self.u = u

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.u(sample, timestep.reshape(-1).expand(sample.shape[0]), encoder_hidden_states, text_embeds, time_ids)


class VE(torch.nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, sample):
        return self.enc(sample)[0]  # the mean: deterministic latent_sample


def to_fp16_weights(path):
    """Store float32 initializers (size > 16) as float16 + Cast(to=float) so the graph keeps fp32 math/I-O."""
    m = onnx.load(path)
    g = m.graph
    new_inits, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) > 16:
            arr = numpy_helper.to_array(init).astype(np.float16)
            name16 = init.name + '__fp16'
            new_inits.append(numpy_helper.from_array(arr, name16))
            casts.append(helper.make_node('Cast', [name16], [init.name], to=TensorProto.FLOAT, name=init.name + '__cast'))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    onnx.checker.check_model(m)
    onnx.save(m, path)


def export(module, args, path, inputs, outputs, dyn):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, path, input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          opset_version=OPSET, do_constant_folding=True)
    to_fp16_weights(path)
    m = onnx.load(path)
    for o in m.graph.output:  # name the channel dim statically (chunk() leaves a symbolic name)
        dims = o.type.tensor_type.shape.dim
        if o.name in ('latent_sample', 'out_sample') and len(dims) == 4:
            dims[1].Clear()
            dims[1].dim_value = 4
    onnx.save(m, path)
    print(f'  {os.path.relpath(path, ROOT)}: {os.path.getsize(path) / 1e6:.2f} MB, '
          f'in {[(i.name, i.type.tensor_type.elem_type) for i in m.graph.input]}, '
          f'out {[o.name for o in m.graph.output]}', flush=True)


def wjson(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


SCHEDULER = {
    '_class_name': 'EulerDiscreteScheduler', '_diffusers_version': '0.27.0',
    'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000,
    'prediction_type': 'epsilon', 'steps_offset': 1, 'timestep_spacing': 'leading', 'interpolation_type': 'linear',
    'use_karras_sigmas': False, 'set_alpha_to_one': False, 'skip_prk_steps': True, 'clip_sample': False,
    'trained_betas': None,
}


def tokenizer(dst, pad):
    os.makedirs(dst, exist_ok=True)
    src = os.path.join(ROOT, 'models', '.clip-tokenizer')
    for f in ('vocab.json', 'merges.txt'):
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    tok = lambda c: {'content': c, 'lstrip': False, 'normalized': True, 'rstrip': False, 'single_word': False}
    wjson(os.path.join(dst, 'special_tokens_map.json'), {
        'bos_token': tok('<|startoftext|>'), 'eos_token': tok('<|endoftext|>'), 'pad_token': pad,
        'unk_token': tok('<|endoftext|>')})
    wjson(os.path.join(dst, 'tokenizer_config.json'), {
        'add_prefix_space': False, 'bos_token': '<|startoftext|>', 'clean_up_tokenization_spaces': True,
        'do_lower_case': True, 'eos_token': '<|endoftext|>', 'errors': 'replace', 'model_max_length': 77,
        'pad_token': pad, 'tokenizer_class': 'CLIPTokenizer', 'unk_token': '<|endoftext|>'})


def te_config(te, d, layers, proj=None):
    c = {'_name_or_path': 'kiln-tiny', 'architectures': ['CLIPTextModelWithProjection' if proj else 'CLIPTextModel'],
         'model_type': 'clip_text_model', 'hidden_size': d, 'intermediate_size': 4 * d, 'num_hidden_layers': layers,
         'num_attention_heads': 4, 'max_position_embeddings': 77, 'vocab_size': 49408, 'hidden_act': 'gelu',
         'bos_token_id': 49406, 'eos_token_id': 49407, 'pad_token_id': 1, 'layer_norm_eps': 1e-5,
         'torch_dtype': 'float16', 'kiln_note': 'tiny causal text transformer; CLIP ids are remapped in-graph to '
         'the words of the kiln-tiny world (unknown ids share one row)', 'kiln_params': nparams(te)}
    if proj:
        c['projection_dim'] = proj
    return c


def vae_config(sf, enc=True):
    return {'_class_name': 'AutoencoderKL', '_diffusers_version': '0.27.0', 'in_channels': 3, 'out_channels': 3,
            'latent_channels': 4, 'block_out_channels': [32, 64, 128, 128], 'sample_size': 256,
            'scaling_factor': sf, 'force_upcast': False,
            'kiln_note': 'vae_encoder outputs the posterior mean as latent_sample (deterministic)' if enc else
            'decode latents / scaling_factor; output in [-1,1]'}


def unet_config(cfg, ctx_dim, xl, n):
    c = {'_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.27.0', 'sample_size': 32,
         'in_channels': 4, 'out_channels': 4, 'cross_attention_dim': ctx_dim,
         'block_out_channels': [cfg['c1'], cfg['c2']], 'kiln_params': n,
         'kiln_note': 'tiny UNet: pixel-unshuffle(2) + coordinate channels, 2 levels, FiLM time/text embedding, '
         'self+cross attention at h/4; spatial size must be a multiple of 4 latents'}
    if xl:
        c.update({'addition_embed_type': 'text_time', 'addition_time_embed_dim': 32,
                  'projection_class_embeddings_input_dim': cfg['proj2'] + 6 * 32})
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--ckpt', default=os.path.join(HERE, 'ckpt'))
    ap.add_argument('--raw', action='store_true', help='export the raw (non-EMA) weights')
    args = ap.parse_args()
    torch.manual_seed(0)
    ck = torch.load(os.path.join(args.ckpt, 'unet.pt'))
    cfg = ck['cfg']
    sf = float(ck['scaling_factor'])
    m = build(cfg)
    m.load_state_dict(ck['model' if args.raw else 'ema'])
    m.eval()
    vae = torch.load(os.path.join(args.ckpt, 'vae.pt'))
    enc, dec = VAEEncoder(), load_decoder(vae)
    enc.load_state_dict(vae['enc'])
    print('step', ck['step'], 'scaling_factor', sf)

    ids = torch.tensor([world.tokenize('a red circle on a blue background'), world.tokenize('')], dtype=torch.int32)
    B = {0: 'batch'}
    BS = {0: 'batch', 1: 'sequence'}
    img_dyn = {0: 'batch', 2: 'height', 3: 'width'}
    lat_dyn = {0: 'batch', 2: 'latent_height', 3: 'latent_width'}
    L1, L2 = cfg['layers'], cfg['layers2']

    for name, xl in (('kiln-tiny', False), ('kiln-tiny-xl', True)):
        out = os.path.join(ROOT, 'models', name)
        if os.path.isdir(out):
            shutil.rmtree(out)
        print(name)
        sample = torch.randn(2, 4, 32, 32)
        ts = torch.tensor([500, 500], dtype=torch.int64)
        # text encoder(s)
        if not xl:
            export(TE(m['te']), (ids,), f'{out}/text_encoder/model.onnx', ['input_ids'],
                   ['last_hidden_state', 'pooler_output'],
                   {'input_ids': BS, 'last_hidden_state': BS, 'pooler_output': B})
        else:
            hs1 = [f'hidden_states.{i}' for i in range(L1 + 1)]
            export(TE(m['te'], xl_outputs=True), (ids,), f'{out}/text_encoder/model.onnx', ['input_ids'],
                   ['last_hidden_state', 'pooler_output', *hs1],
                   {'input_ids': BS, 'last_hidden_state': BS, 'pooler_output': B, **{h: BS for h in hs1}})
            hs2 = [f'hidden_states.{i}' for i in range(L2 + 1)]
            ids2 = torch.tensor([world.tokenize('a red circle on a blue background', pad_id=0),
                                 world.tokenize('', pad_id=0)], dtype=torch.int64)
            export(TE(m['te2'], with_proj=True), (ids2,), f'{out}/text_encoder_2/model.onnx', ['input_ids'],
                   ['text_embeds', 'last_hidden_state', *hs2],
                   {'input_ids': BS, 'text_embeds': B, 'last_hidden_state': BS, **{h: BS for h in hs2}})
            wjson(f'{out}/text_encoder_2/config.json', te_config(m['te2'], cfg['d2'], L2, cfg['proj2']))
        wjson(f'{out}/text_encoder/config.json', te_config(m['te'], cfg['d'], L1))
        # unet
        if not xl:
            ehs = torch.randn(2, 77, cfg['d'])
            export(UNetSD(m['unet']), (sample, ts, ehs), f'{out}/unet/model.onnx',
                   ['sample', 'timestep', 'encoder_hidden_states'], ['out_sample'],
                   {'sample': lat_dyn, 'timestep': B, 'encoder_hidden_states': BS, 'out_sample': lat_dyn})
            wjson(f'{out}/unet/config.json', unet_config(cfg, cfg['d'], False, nparams(m['unet'])))
        else:
            ehs = torch.randn(2, 77, cfg['d'] + cfg['d2'])
            te_ = torch.randn(2, cfg['proj2'])
            tid = torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)
            export(UNetXL(m['unet_xl']), (sample, ts, ehs, te_, tid), f'{out}/unet/model.onnx',
                   ['sample', 'timestep', 'encoder_hidden_states', 'text_embeds', 'time_ids'], ['out_sample'],
                   {'sample': lat_dyn, 'timestep': B, 'encoder_hidden_states': BS, 'text_embeds': B, 'time_ids': B,
                    'out_sample': lat_dyn})
            wjson(f'{out}/unet/config.json', unet_config(cfg, cfg['d'] + cfg['d2'], True, nparams(m['unet_xl'])))
        # vae
        export(VE(enc), (torch.randn(1, 3, 256, 256),), f'{out}/vae_encoder/model.onnx', ['sample'],
               ['latent_sample'], {'sample': img_dyn, 'latent_sample': lat_dyn})
        wjson(f'{out}/vae_encoder/config.json', vae_config(sf, True))
        export(dec, (torch.randn(1, 4, 32, 32),), f'{out}/vae_decoder/model.onnx', ['latent_sample'], ['sample'],
               {'latent_sample': lat_dyn, 'sample': img_dyn})
        wjson(f'{out}/vae_decoder/config.json', vae_config(sf, False))
        # tokenizers, scheduler, index
        tokenizer(f'{out}/tokenizer', '<|endoftext|>')
        sched = dict(SCHEDULER)
        if xl:
            tokenizer(f'{out}/tokenizer_2', '!')
        wjson(f'{out}/scheduler/scheduler_config.json', sched)
        if not xl:
            index = {'_class_name': 'OnnxStableDiffusionPipeline', '_diffusers_version': '0.27.0',
                     'feature_extractor': [None, None], 'requires_safety_checker': False,
                     'safety_checker': [None, None], 'scheduler': ['diffusers', 'EulerDiscreteScheduler'],
                     'text_encoder': ['diffusers', 'OnnxRuntimeModel'], 'tokenizer': ['transformers', 'CLIPTokenizer'],
                     'unet': ['diffusers', 'OnnxRuntimeModel'], 'vae_decoder': ['diffusers', 'OnnxRuntimeModel'],
                     'vae_encoder': ['diffusers', 'OnnxRuntimeModel']}
        else:
            index = {'_class_name': 'StableDiffusionXLPipeline', '_diffusers_version': '0.27.0',
                     'force_zeros_for_empty_prompt': True, 'scheduler': ['diffusers', 'EulerDiscreteScheduler'],
                     'text_encoder': ['transformers', 'CLIPTextModel'],
                     'text_encoder_2': ['transformers', 'CLIPTextModelWithProjection'],
                     'tokenizer': ['transformers', 'CLIPTokenizer'], 'tokenizer_2': ['transformers', 'CLIPTokenizer'],
                     'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL']}
        wjson(f'{out}/model_index.json', index)
        # Trained at 256x256: Kiln denoises there and resizes (kiln.json native_size, README).
        wjson(f'{out}/kiln.json', {'native_size': 256})
        total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
        print(f'  total {total / 1e6:.2f} MB')


if __name__ == '__main__':
    main()
