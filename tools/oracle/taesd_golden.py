"""diffusers' AutoencoderTiny decoder on a small random-weight model, for test/graphs/taesd.test.ts.

Writes into OUT_DIR (test/fixtures/taesd/):
  config.json, diffusion_pytorch_model.safetensors  the model as save_pretrained writes it: TAESD's
      block layout (encoder 1,3,3,3 and decoder 3,3,3,1 blocks, 4 stages, relu, nearest 2x), narrow
      widths (encoder 4, decoder 12) so that the files stay small
  golden.safetensors  `latent` (2, 4, 6, 10), N(0, 2^2) so that many values reach the tanh clamp,
      and `decoded` = decode(latent).sample with 2 torch threads; `decoded_f64`, the same in float64
  manifest.json  versions, seeds, parameter counts (this model's decoder, and the real TAESD
      config's: AutoencoderTiny() with diffusers' defaults, which are madebyollin/taesd's config),
      and `readme_tolerance`: torch's own float32 rounding spread on this input, the largest
      |decoded - decoded'| over 1 thread instead of 2 and torch's non-mkldnn conv kernels (golden.ts
      roundingTolerance takes it as the golden README's figure)

Weights: torch's default init, then every conv weight scaled so that each layer keeps the
activations' size (kaiming for relu: std sqrt(2 / fan_in)) and every bias N(0, 0.1) (the last conv's +0.8, so that the picture is centred): with the default
init the residual stack would fade the picture to a constant and the test would compare little.

Run in the oracle environment (bench/README.md, "Enabling the PyTorch side"):
  source /work/shared/oracle/env.sh /work/oracle
  /usr/bin/python3 tools/oracle/taesd_golden.py test/fixtures/taesd
"""
import json, os, sys
import torch
from safetensors.torch import save_file
import diffusers
from diffusers import AutoencoderTiny

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '..', '..', 'test', 'fixtures', 'taesd')
os.makedirs(out, exist_ok=True)

SEED = 1234
torch.manual_seed(SEED)
model = AutoencoderTiny(
    encoder_block_out_channels=(4, 4, 4, 4),
    decoder_block_out_channels=(12, 12, 12, 12),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith('.weight') and p.dim() == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            p.copy_(torch.randn_like(p) * (2.0 / fan_in) ** 0.5 * 0.6)
        elif name.endswith('.bias'):
            p.copy_(torch.randn_like(p) * 0.1)
    # Centre the picture: the last conv's bias puts the [0, 1] output near 0.5.
    list(model.decoder.layers)[-1].bias.add_(0.8)
model.save_pretrained(out, safe_serialization=True)
# save_pretrained writes the library's defaults and versions into config.json: keep it.

latent = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(SEED + 1)) * 2.0


def decode(threads, mkldnn=True):
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    try:
        with torch.no_grad():
            return model.decode(latent).sample.contiguous()
    finally:
        torch.backends.mkldnn.enabled = True


decoded = decode(2)
# torch's own rounding spread: other thread counts, and its other CPU conv kernels (mkldnn off).
# This model's convs are too small to split across threads (that spread is 0); the kernels differ.
spreads = {
    'threads_1_vs_2': (decoded - decode(1)).abs().max().item(),
    'mkldnn_off_vs_on': (decoded - decode(2, mkldnn=False)).abs().max().item(),
}
spread = max(spreads.values())
with torch.no_grad():
    decoded_f64 = AutoencoderTiny.from_config(model.config).double().eval()
    decoded_f64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    decoded_f64 = decoded_f64.decode(latent.double()).sample.contiguous()
save_file({'latent': latent.contiguous(), 'decoded': decoded, 'decoded_f64': decoded_f64}, os.path.join(out, 'golden.safetensors'))

reloaded = AutoencoderTiny.from_pretrained(out).eval()
torch.set_num_threads(2)
with torch.no_grad():
    same = torch.equal(reloaded.decode(latent).sample, decoded)
assert same, 'the saved model does not reproduce its output'

count = lambda m: sum(p.numel() for p in m.parameters())
manifest = {
    'generator': 'tools/oracle/taesd_golden.py',
    'diffusers': diffusers.__version__,
    'torch': torch.__version__,
    'seed': SEED,
    'latent': {'shape': list(latent.shape), 'std': 2.0, 'abs_max': latent.abs().max().item(), 'beyond_3': int((latent.abs() > 3).sum())},
    'decoded': {'shape': list(decoded.shape), 'min': decoded.min().item(), 'max': decoded.max().item(), 'std': decoded.std().item()},
    'decoder_parameters': count(model.decoder),
    'encoder_parameters': count(model.encoder),
    'full_size_decoder_parameters': count(AutoencoderTiny().decoder),
    'readme_tolerance': spread,
    'spreads': spreads,
    'torch_vs_f64': (decoded.double() - decoded_f64).abs().max().item(),
}
with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
    f.write('\n')
print(json.dumps(manifest, indent=1))
