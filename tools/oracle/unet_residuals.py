"""diffusers' UNet2DConditionModel with ControlNet residuals, on the golden tiny UNets: the outputs
Kiln's residual-taking UNets (src/graphs/unet.ts, UnetBuildOptions.controlResiduals) are checked
against in test/graphs/unet-residuals.test.ts. diffusers-golden has no ControlNet cases.

Inputs: components/<unet>/inputs.safetensors (sample, timestep, encoder_hidden_states, SDXL
text_embeds / time_ids) and residuals from a formula both sides compute exactly (residualValues
in the test): residual j (the down residuals in order, then the mid one as j = N), element i:
    (((i + 7919 j) * 2654435761) mod 2^32) / 2^32 - 0.5, times 0.5, as float32
passed as down_block_additional_residuals / mid_block_additional_residual. Written:
`<unet>.shapes` int64 [N+1, 4] (the residual shapes, diffusers' down_block_res_samples order, mid
last), `<unet>.out_sample` with the residuals, `<unet>.plain` without them (this torch's own
drift from the golden outputs), `<unet>.mid_only` with only the mid residual.

Run in the oracle environment (../../../shared/oracle/README.md):
  source ../shared/oracle/env.sh SRC_DIR
  /usr/bin/python3 tools/oracle/unet_residuals.py ../shared/data/diffusers-golden test/graphs/fixtures
"""
import os, sys
os.environ['OPENBLAS_NUM_THREADS'] = '1'
GOLDEN, OUT = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', '..', 'shared', 'oracle'))
import oracle_compat  # noqa: F401  (torch 1.13's baddbmm fix)
import numpy as np
import torch
torch.set_num_threads(1)
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file


def residual_values(n, j):
    i = np.arange(n, dtype=np.uint64) + np.uint64(7919 * j)
    u = (i * np.uint64(2654435761)) % np.uint64(2 ** 32)
    return ((u.astype(np.float64) / 2 ** 32 - 0.5) * 0.5).astype(np.float32)


def down_shapes(unet, feeds):
    """The shapes of down_block_res_samples, read from diffusers' own down pass."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(tuple(s.shape) for s in o[1])))
    mid = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(tuple(o.shape))))
    with torch.no_grad():
        unet(**feeds)
    for h in hooks:
        h.remove()
    return shapes, mid[0]


out = {}
for name in ['unet_sd15', 'unet_sdxl']:
    folder = os.path.join(GOLDEN, 'components', name)
    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    inputs = load_file(os.path.join(folder, 'inputs.safetensors'))
    feeds = {'sample': inputs['sample'], 'timestep': inputs['timestep'], 'encoder_hidden_states': inputs['encoder_hidden_states']}
    if 'text_embeds' in inputs:
        feeds['added_cond_kwargs'] = {'text_embeds': inputs['text_embeds'], 'time_ids': inputs['time_ids']}
    downs, mid_shape = down_shapes(unet, feeds)
    shapes = downs + [mid_shape]
    residuals = [torch.from_numpy(residual_values(int(np.prod(s)), j).reshape(s)) for j, s in enumerate(shapes)]
    with torch.no_grad():
        plain = unet(**feeds).sample
        full = unet(**feeds, down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1]).sample
        zeros = tuple(torch.zeros_like(r) for r in residuals[:-1])
        mid_only = unet(**feeds, down_block_additional_residuals=zeros, mid_block_additional_residual=residuals[-1]).sample
    golden = load_file(os.path.join(folder, 'outputs.safetensors'))['sample']
    print(f'{name}: {len(downs)} down residuals + mid; shapes {shapes}; '
          f'effect max |full - plain| {(full - plain).abs().max().item():.3g}, mid only {(mid_only - plain).abs().max().item():.3g}; '
          f'this torch vs golden {(plain - golden).abs().max().item():.3g}')
    out[f'{name}.shapes'] = torch.tensor(shapes, dtype=torch.int64)
    out[f'{name}.out_sample'] = full.contiguous()
    out[f'{name}.plain'] = plain.contiguous()
    out[f'{name}.mid_only'] = mid_only.contiguous()

os.makedirs(OUT, exist_ok=True)
save_file(out, os.path.join(OUT, 'unet-residuals.safetensors'))
