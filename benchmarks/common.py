"""What the benchmarks share: the configs they run, the PyTorch reference's weights (written once, read by both
sides), one subprocess per measured side, and the machine figures (peak memory, fp32 matmul peak).

Both sides of a figure load the same random weights from the same diffusers folder: the PyTorch reference with
`from_pretrained`, ours with `gm.models.loading.create_model(config, weight=folder)` through the key mappings of
`gm/weights/`. The reference's architecture is derived from our YAML config, so the two cannot drift apart.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name -> (inference config, textual-inversion training config), relative to the repository root
    "tiny": ("configs/inference/sd_xl_tiny.yaml", "configs/training/sd_xl_tiny_textual_inversion.yaml"),
    "small": ("configs/inference/sd_xl_small.yaml", "configs/training/sd_xl_small_textual_inversion.yaml"),
    # the real SDXL base 1.0 architecture, on zero weights (a sparse diffusers folder: no disk, the real memory)
    "full": ("configs/inference/sd_xl_base.yaml", "configs/training/sd_xl_base_finetune_textual_inversion.yaml"),
}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sdxl-ti-bench")
RESULT_PREFIX = "BENCH_RESULT "  # a side's JSON result line on its stdout
# diffusers' SDXL base scheduler config (both sides walk the same DDPM schedule)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="leading", steps_offset=1)


def config_path(name, training=False):
    return os.path.join(ROOT, CONFIGS[name][1 if training else 0])


# ------------------------------------------------------------------------------------- the reference's weights


def reference_architecture(model_config):
    """diffusers / transformers constructor arguments of the four SDXL components that `model_config` (our sgm
    config's `model` node) describes: {"unet": kwargs, "vae": kwargs, "text_encoder": kwargs, "text_encoder_2": kwargs}."""
    params = model_config.params
    net = params.network_config.params
    levels = len(net.channel_mult)
    widths = [net.model_channels * m for m in net.channel_mult]
    attention = [2 ** level in net.attention_resolutions for level in range(levels)]
    depth = net.transformer_depth if not isinstance(net.transformer_depth, int) else [net.transformer_depth] * levels
    embedders = params.conditioner_config.params.emb_models
    vit_l = next(e.params for e in embedders if e.target.endswith("FrozenCLIPEmbedder"))
    bigg = next(e.params for e in embedders if e.target.endswith("FrozenOpenCLIPEmbedder2"))
    time_dim = next(e.params.outdim for e in embedders if e.target.endswith("ConcatTimestepEmbedderND"))
    dd = params.first_stage_config.params.ddconfig
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    return {
        "unet": dict(
            sample_size=64, in_channels=net.in_channels, out_channels=net.out_channels,
            layers_per_block=net.num_res_blocks, block_out_channels=widths,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            transformer_layers_per_block=list(depth),
            # diffusers' `attention_head_dim` is the number of heads per level (unused on levels without attention)
            attention_head_dim=[max(1, w // net.num_head_channels) for w in widths],
            cross_attention_dim=net.context_dim, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=net.adm_in_channels),
        "vae": dict(
            in_channels=dd.in_channels, out_channels=dd.out_ch, latent_channels=dd.z_channels,
            block_out_channels=[dd.ch * m for m in dd.ch_mult], layers_per_block=dd.num_res_blocks,
            down_block_types=["DownEncoderBlock2D"] * len(dd.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(dd.ch_mult),
            norm_num_groups=32, sample_size=dd.resolution, scaling_factor=params.scale_factor),
        "text_encoder": dict(
            clip, hidden_act="quick_gelu", pad_token_id=49407, hidden_size=vit_l.width, num_hidden_layers=vit_l.layers,
            num_attention_heads=vit_l.heads, intermediate_size=4 * vit_l.width, projection_dim=vit_l.width),
        "text_encoder_2": dict(
            clip, hidden_act="gelu", pad_token_id=0, hidden_size=bigg.width, num_hidden_layers=bigg.layers,
            num_attention_heads=bigg.heads, intermediate_size=4 * bigg.width, projection_dim=bigg.embed_dim),
    }


def build_reference(component, kwargs):
    """One reference module at its library's (seeded) initial weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    cls = classes[component]
    return cls(CLIPTextConfig(**kwargs)) if component.startswith("text") else cls(**kwargs)


def write_tokenizer(folder, pad_token="<|endoftext|>"):
    """A transformers CLIPTokenizer folder (vocab.json, merges.txt) in the published SDXL layout, from the BPE
    merges bundled with gm; returns `folder`."""
    from gm.modules.encoders.tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return folder


def write_zero_safetensors(path, shapes, dtypes=None):
    """A safetensors file of these {name: shape}, all zeros, that costs no disk: the header is written and the
    file extended to its full size as a sparse file (its data section is a hole, which reads as zeros).
    Tensors are F16 unless `dtypes` ({name: safetensors dtype}) says otherwise."""
    import struct

    itemsizes = {"F16": 2, "F32": 4, "I64": 8}
    header, offset = {}, 0
    for name, shape in shapes.items():
        dtype = (dtypes or {}).get(name, "F16")
        size = int(np.prod(shape)) * itemsizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def save_component(module, folder, zero_weights):
    """Write one reference module as its library's folder: config and weights (seeded random as initialised, or
    zeros in a sparse fp16 file for a model too large to initialise and write here)."""
    if not zero_weights:
        module.save_pretrained(folder, safe_serialization=True)
        return
    os.makedirs(folder)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        stem = "diffusion_pytorch_model"
    else:  # transformers
        module.config.save_pretrained(folder)
        stem = "model"
    write_zero_safetensors(os.path.join(folder, f"{stem}.safetensors"),
                           {k: tuple(v.shape) for k, v in module.state_dict().items()})


def reference_weights(name, seed=0, folder=None):
    """The diffusers folder of config `name`, written on first use (safetensors, tokenizers, scheduler,
    model_index.json) under ~/.cache/sdxl-ti-bench/, then reused: seeded random fp32 weights, or for the
    full-size model zero weights in sparse files (the real layout, memory and arithmetic at no disk cost)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from gm.models.loading import load_config

    zero_weights = name == "full"
    folder = folder or os.path.join(CACHE, f"{name}-zero" if zero_weights else f"{name}-seed{seed}")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing the reference weights of '{name}' to {folder} (once) ...", file=sys.stderr)
    torch.manual_seed(seed)
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    for component, kwargs in reference_architecture(load_config(config_path(name)).model).items():
        with torch.device("meta" if zero_weights else "cpu"):
            module = build_reference(component, kwargs)
        save_component(module, os.path.join(tmp, component), zero_weights)
        index[component] = ["diffusers" if component in ("unet", "vae") else "transformers", type(module).__name__]
        del module
    write_tokenizer(os.path.join(tmp, "tokenizer"), "<|endoftext|>")
    write_tokenizer(os.path.join(tmp, "tokenizer_2"), "!")  # as published
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, folder)
    return folder


# ------------------------------------------------------------------------------------------------ measuring


def memory_gb(field="VmHWM"):
    """This process's resident memory from /proc/self/status: VmHWM (its peak so far) or VmRSS (now), in GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def log(message):
    """Progress of a side on stderr, with its resident memory now and at peak."""
    print(f"[{os.getpid()}] {message} (RSS {memory_gb('VmRSS'):.2f} GB, peak {memory_gb():.2f} GB)", file=sys.stderr,
          flush=True)


def median_time(run, steps):
    """Median wall time of `steps` calls of run() (each must block until its work is done), and all the times."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def torch_matmul_peak(size=4096, repeats=3):
    """The best fp32 GFLOP/s of a square torch matmul (the machine's peak, quoted for model FLOP utilisation)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(median_time(lambda: torch.mm(a, b), 1)[0] for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def mindspore_matmul_peak(size=4096, repeats=3):
    """The best fp32 GFLOP/s of a square MindSpore matmul in a compiled graph."""
    from mindspore import Tensor, nn, ops

    class MatMul(nn.Cell):
        def construct(self, a, b):
            return ops.matmul(a, b)

    net = MatMul()
    a = Tensor(np.random.randn(size, size).astype(np.float32))
    b = Tensor(np.random.randn(size, size).astype(np.float32))
    net(a, b).asnumpy()
    best = min(median_time(lambda: net(a, b).asnumpy(), 1)[0] for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def set_mindspore_threads(threads):
    """Graph mode on the device every command chooses (`gm.device`: Ascend where its toolkit is, else the CPU),
    on the CPU with `threads` kernel threads (MindSpore's default is 25, whatever the core count)."""
    import mindspore as ms

    from gm.device import set_device

    if set_device("auto") == "CPU":
        ms.device_context.cpu.op_tuning.threads_num(threads)


def set_torch_threads(threads):
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(True)


def emit(result):
    """A side's last act: its result as one JSON line on stdout, for the parent to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_side(script, side, argv, timeout=None, may_run_out_of_memory=False):
    """Run `script --side side argv...` in a fresh Python process (so its peak memory is its own); its result dict.

    The child's stderr and ordinary stdout pass through; a failing side raises with its exit code, except that
    with `may_run_out_of_memory` a side killed by the kernel (SIGKILL: out of memory) gives None."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, script, "--side", side] + list(argv)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            print(line)
    if may_run_out_of_memory and proc.returncode == -9:
        print(f"the {side} side was killed (out of memory)", file=sys.stderr)
        return None
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"the {side} side failed (exit code {proc.returncode}): {' '.join(cmd)}")
    return result


def ratio(ours, reference):
    return ours / reference if reference else float("nan")
