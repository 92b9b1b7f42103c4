"""Step time of the host adapters: the same TI step, the same tiny SD1.5-shaped checkpoint, in a real
A1111 and in a real Forge 2 (opt-in; run with the host's own python, one host per run):

    cd $TI_TRAINER_FORGE_DIR && venv/bin/python <repo>/bench/host_steps.py --host forge --ckpt CKPT --work DIR
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=DIR/hf-home \
        <a1111 python> <repo>/bench/host_steps.py --host a1111 --host-dir $TI_TRAINER_HOST_DIR --ckpt CKPT --work DIR

CKPT is what tests/host/make_tiny_forge_checkpoint.py writes (Forge detects the family from the UNet's
shape, so the Forge checkpoint is the one both hosts can load). For A1111 the script writes, under
DIR, the LDM yaml of that UNet and an offline HF cache with the real CLIP-L tokenizer and config
(weights come from the checkpoint). A step: encode the prompt with the vectors through the host's
prompt path, UNet forward to the eps loss, backward to the vectors, AdamW. Timed with the main
thread's CPU time on 1 torch thread (a loaded machine's wall clock mostly measures waiting), wall
time printed too. Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "benchtok123"
sys.path.append(os.path.join(REPO, "tests", "host"))  # the boots of the real-host checks
# the UNet of make_tiny_forge_checkpoint.build, as an LDM config; CLIP-L and VAE are SD1.5's
A1111_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params: {linear_start: 0.00085, linear_end: 0.0120, num_timesteps_cond: 1, log_every_t: 200,
    timesteps: 1000, first_stage_key: jpg, cond_stage_key: txt, image_size: 64, channels: 4,
    cond_stage_trainable: false, conditioning_key: crossattn, monitor: val/loss_simple_ema,
    scale_factor: 0.18215, use_ema: false,
    unet_config: {target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {
      image_size: 32, in_channels: 4, out_channels: 4, model_channels: 320, attention_resolutions: [1],
      num_res_blocks: 1, channel_mult: [1], num_heads: 8, use_spatial_transformer: true,
      transformer_depth: 1, context_dim: 768, use_checkpoint: false, legacy: false}},
    first_stage_config: {target: ldm.models.autoencoder.AutoencoderKL, params: {embed_dim: 4,
      monitor: val/rec_loss, ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3,
      out_ch: 3, ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0},
      lossconfig: {target: torch.nn.Identity}}},
    cond_stage_config: {target: ldm.modules.encoders.modules.FrozenCLIPEmbedder}}
"""
CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
          "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
          "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
          "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def boot_a1111(a: argparse.Namespace):
    """tests/host/check_adapter.py's boot, with the work folder laid out as its --tiny-dir."""
    import check_adapter
    import make_tiny_checkpoint as mk

    ckpts = os.path.join(a.work, "models", "Stable-diffusion")
    os.makedirs(ckpts, exist_ok=True)
    link = os.path.join(ckpts, "tiny-sd1.safetensors")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(a.ckpt), link)
    with open(os.path.join(ckpts, "tiny-sd1.yaml"), "w", encoding="utf-8") as f:
        f.write(A1111_YAML)
    snap = mk.write_clip_l_hf_cache(os.path.join(a.work, "hf-home"))
    with open(os.path.join(snap, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CLIP_L, f)
    check_adapter.boot(argparse.Namespace(tiny_dir=a.work, host_dir=a.host_dir, family="sd1", host_arg=[],
                                          data_dir=os.path.join(a.work, "data")))
    from lib_ti.webui import host_model

    return host_model.borrow()


def boot_forge(a: argparse.Namespace):
    import check_forge_adapter as chk

    chk.boot(os.path.abspath(a.ckpt), os.path.join(a.work, "data"))
    sys.modules["modules.shared"].opts.data["live_previews_enable"] = False
    chk.txt2img("a photo of a red cat")  # Forge loads the model on first use
    from lib_ti.webui import host_model

    return host_model.borrow()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", choices=("a1111", "forge"), required=True)
    ap.add_argument("--host-dir", default=os.environ.get("TI_TRAINER_HOST_DIR", ""), help="A1111 only")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work", required=True, help="scratch folder (data dir; A1111: yaml and HF cache)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    a.work = os.path.abspath(a.work)
    model = boot_a1111(a) if a.host == "a1111" else boot_forge(a)

    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = model.token_embeddings("ball")
    vectors = {k: v[:1].repeat(2, 1).clone().float().to(model.device).requires_grad_(True) for k, v in rows.items()}
    opt = torch.optim.AdamW(list(vectors.values()), lr=1e-3)
    alphas = model.alphas_cumprod().float()
    texts = [f"a photo of {TOKEN}"]
    cpu, wall, losses = [], [], []
    with model.training(gradient_checkpointing=a.checkpointing):
        for i in range(a.warmup + a.steps):
            x0 = torch.randn(1, 4, a.latent, a.latent, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (1,), generator=g)
            a_t = alphas[t].view(-1, 1, 1, 1)
            x_t = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise).to(model.device, model.dtype)
            c0, w0 = time.thread_time(), time.perf_counter()
            cond = model.encode_prompts(texts, TOKEN, vectors)
            pred = model.predict(x_t, t.to(model.device), cond)
            loss = torch.nn.functional.mse_loss(pred.float(), noise.to(pred.device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if i >= a.warmup:
                cpu.append((time.thread_time() - c0) * 1e3)
                wall.append((time.perf_counter() - w0) * 1e3)
    res = {"host": a.host, "adapter": type(model).__name__, "dtype": str(model.dtype), "latent": a.latent,
           "checkpointing": a.checkpointing, "steps": a.steps, "cpu_ms_median": round(statistics.median(cpu), 1),
           "cpu_ms_min": round(min(cpu), 1), "wall_ms_median": round(statistics.median(wall), 1),
           "torch": torch.__version__, "loss_finite": all(x == x for x in losses)}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
