#!/usr/bin/env python3
"""PyTorch side of `npm run bench:graphs`: diffusers' own UNet2DConditionModel (or AutoencoderKL /
CLIPTextModel[WithProjection] for --count-params) built from a config.json with seeded random
weights, fp32 on CPU.

  timing:  graphs_torch.py --config sd15-unet|FILE.json [--threads 2] [--warmup 1] [--runs 3]
                            [--batch 2] [--height 64] [--width 64] [--seq 77] [--seed 0]
  counting: graphs_torch.py --config NAME|FILE.json --count-params

Prints one JSON line. Timing: {"median_ms", "runs", "peak_rss_mb", "torch", "diffusers", ...}.
Counting builds the module with accelerate's init_empty_weights (no memory for weights) and
prints {"name", "class", "parameters"}.

A NAME is one of src/graphs/reference-configs.ts's REFERENCE_MODELS, read through node + tsx
from the repository root, so the configs have one source. Run it with Debian's /usr/bin/python3
and the oracle environment's PYTHONPATH (see bench/README.md, section bench:graphs).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config.json path, or a REFERENCE_MODELS name (e.g. sd15-unet)")
    ap.add_argument("--count-params", action="store_true", help="only build (empty weights) and count parameters")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and OMP/OpenBLAS threads)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guided step")
    ap.add_argument("--height", type=int, default=64, help="latent height (64 = 512 px)")
    ap.add_argument("--width", type=int, default=64, help="latent width")
    ap.add_argument("--seq", type=int, default=77, help="text tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timestep", type=float, default=999.0)
    ap.add_argument("--serve", action="store_true",
                    help="after warm-up print {\"ready\": ...}, then one step per 'run' line on stdin ({\"ms\": x}); "
                         "'stop' prints {\"done\": ...} (bench:graphs --interleave)")
    return ap.parse_args()


def load_config(spec):
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return os.path.basename(spec), json.load(f)
    # One source for the real configs: the TypeScript module.
    script = (
        "const m = await import('./src/graphs/reference-configs.ts');"
        f"const r = m.REFERENCE_MODELS.find((x) => x.name === {json.dumps(spec)});"
        "if (!r) { console.error('unknown config name; known: ' + m.REFERENCE_MODELS.map((x) => x.name).join(', ')); process.exit(2); }"
        "process.stdout.write(JSON.stringify(r.config));"
    )
    out = subprocess.run(
        ["node", "--import", "tsx", "--input-type=module", "-e", script],
        cwd=ROOT, capture_output=True, text=True,
    )
    if out.returncode != 0:
        sys.exit(f"graphs_torch.py: cannot resolve config {spec!r}: {out.stderr.strip()}")
    return spec, json.loads(out.stdout)


def model_class(config):
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name in ("UNet2DConditionModel", "AutoencoderKL"):
        import diffusers
        return name, getattr(diffusers, name)
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        import transformers
        return name, getattr(transformers, name)
    sys.exit(f"graphs_torch.py: unsupported class {name!r}")


def build(cls_name, cls, config):
    if cls_name.startswith("CLIP"):
        from transformers import CLIPTextConfig
        return cls(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")}))
    return cls.from_config(config)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    args = parse_args()
    # Thread pools read these at load time: set them before torch is imported.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    name, config = load_config(args.config)
    import torch
    import diffusers

    torch.set_num_threads(args.threads)
    cls_name, cls = model_class(config)

    if args.count_params:
        from accelerate import init_empty_weights
        with init_empty_weights():
            model = build(cls_name, cls, config)
        count = sum(p.numel() for p in model.parameters())
        print(json.dumps({"name": name, "class": cls_name, "parameters": count}))
        return

    if cls_name != "UNet2DConditionModel":
        sys.exit("graphs_torch.py: timing is implemented for UNet2DConditionModel configs only")

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build(cls_name, cls, config).eval()
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())

    gen = torch.Generator().manual_seed(args.seed + 1)
    b = args.batch
    sample = torch.randn(b, config.get("in_channels", 4), args.height, args.width, generator=gen)
    timestep = torch.full((b,), args.timestep)
    context = torch.randn(b, args.seq, config["cross_attention_dim"], generator=gen)
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        n_time = 6 if config["projection_class_embeddings_input_dim"] == 2816 else 5  # refiner: aesthetic score
        pooled = config["projection_class_embeddings_input_dim"] - n_time * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, pooled, generator=gen),
            # (original size, crop top-left, target size) or, for the refiner, (original size, crop, aesthetic score)
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0] + ([1024.0, 1024.0] if n_time == 6 else [6.0])] * b),
        }

    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "config": name,
        "parameters": params,
        "threads": args.threads,
        "batch": b,
        "latent": [args.height, args.width],
        "build_s": round(build_s, 2),
    }

    def step():
        t0 = time.perf_counter()
        with torch.no_grad():
            y = model(sample, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return y, round((time.perf_counter() - t0) * 1000.0, 1)

    if args.serve:
        out = None
        for _ in range(args.warmup):
            out, ms = step()
            print(f"graphs_torch.py: warm-up {ms:.0f} ms", file=sys.stderr, flush=True)
        print(json.dumps({"ready": info}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            out, ms = step()
            print(json.dumps({"ms": ms}), flush=True)
        print(json.dumps({"done": {"peak_rss_mb": round(peak_rss_mb(), 1),
                                   "finite": bool(out is not None and torch.isfinite(out).all())}}), flush=True)
        return

    runs = []
    for i in range(args.warmup + args.runs):
        out, ms = step()
        if i >= args.warmup:
            runs.append(ms)
        print(f"graphs_torch.py: {'warm-up' if i < args.warmup else 'run'} {ms:.0f} ms", file=sys.stderr, flush=True)
    assert tuple(out.shape) == (b, config.get("out_channels", 4), args.height, args.width), out.shape
    ordered = sorted(runs)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    print(json.dumps({
        "median_ms": round(median, 1),
        "runs": runs,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **info,
        "finite": bool(torch.isfinite(out).all()),
    }))


if __name__ == "__main__":
    main()
