"""Tiny Stable Diffusion and SDXL pipelines built from configs (random weights, nothing downloaded).

The layouts are the real ones scaled down: CLIP text encoders (``CLIPTextModel``; SDXL adds a
``CLIPTextModelWithProjection`` whose pooled, projected output feeds the UNet's ``text_embeds``), a CLIP BPE
tokenizer over a vocabulary these helpers write (single characters, no merges), an ``AutoencoderKL``, and a
``UNet2DConditionModel`` with cross-attention (SDXL: ``addition_embed_type="text_time"``, so the UNet also
takes ``added_cond_kwargs={"text_embeds", "time_ids"}``).
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TEXT_LEN = 16  # tokenizer model_max_length = the text encoders' positions (one token a character)
TEXT_DIM = 16
LATENT = 8  # latent side; images are LATENT * 2 (the VAE downsamples once)


def write_tokenizer(folder: Path):
    """A CLIP tokenizer over lowercase letters (one token per character, ``</w>`` ending a word)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LEN)


def _text_config(vocab_size: int, **over):
    from transformers import CLIPTextConfig

    cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_DIM, intermediate_size=24,
               num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=TEXT_LEN,
               hidden_act="gelu")
    cfg.update(over)
    return CLIPTextConfig(**cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4, sample_size=2 * LATENT, layers_per_block=1).eval()


def sd_unet_config() -> dict:
    return dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                norm_num_groups=8, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def sdxl_unet_config() -> dict:
    # text_embeds: the projected pooled output of text_encoder_2 (projection_dim TEXT_DIM); time_ids: 6 numbers,
    # each embedded in addition_time_embed_dim: projection input = TEXT_DIM + 6 * 4
    return dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                norm_num_groups=8, cross_attention_dim=2 * TEXT_DIM, attention_head_dim=(4, 8),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=TEXT_DIM + 6 * 4)


def make_sd_pipeline(tmp: Path, scheduler=None, seed: int = 0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = write_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd_unet_config()).eval()
    text = CLIPTextModel(_text_config(len(tok))).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler or DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_pipeline(tmp: Path, scheduler=None, seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = write_tokenizer(tmp / "tokenizer")
    tok2 = write_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sdxl_unet_config()).eval()
    text = CLIPTextModel(_text_config(len(tok))).eval()
    text2 = CLIPTextModelWithProjection(_text_config(len(tok2), projection_dim=TEXT_DIM)).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler or EulerDiscreteScheduler(),
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
