"""Tiny Hugging Face models built from configs and loaded back through from_pretrained,
so the real loading path is exercised without any download."""
from __future__ import annotations

import torch

VOCAB = 97


def _roundtrip(model_cls, config, tmp_path):
    torch.manual_seed(0)
    model = model_cls(config)
    path = tmp_path / f"{config.model_type}-{id(config)}"
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, local_files_only=True).eval()


def llama(tmp_path, kv_heads: int = 2, layers: int = 2, dtype=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=128)
    m = _roundtrip(LlamaForCausalLM, cfg, tmp_path)
    return m.to(dtype) if dtype is not None else m


def gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    return _roundtrip(GPT2LMHeadModel, cfg, tmp_path)


def opt(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                    word_embed_proj_dim=64, max_position_embeddings=128)
    return _roundtrip(OPTForCausalLM, cfg, tmp_path)


def bert(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    return _roundtrip(BertModel, cfg, tmp_path)


def t5(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
                   decoder_start_token_id=0)
    return _roundtrip(T5ForConditionalGeneration, cfg, tmp_path)


def vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                    patch_size=8)
    return _roundtrip(ViTModel, cfg, tmp_path)


def clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=VOCAB, max_position_embeddings=32),
                     vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=16, patch_size=8), projection_dim=32)
    return _roundtrip(CLIPModel, cfg, tmp_path)


def siglip(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32),
                       vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=16, patch_size=8))
    return _roundtrip(SiglipModel, cfg, tmp_path)


def mistral(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=None)
    return _roundtrip(MistralForCausalLM, cfg, tmp_path)


def qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128)
    return _roundtrip(Qwen2ForCausalLM, cfg, tmp_path)


IMAGE_TOKEN = VOCAB - 1


def blip2(tmp_path, text: str = "opt"):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    if text == "opt":
        text_config = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                           vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64)
    else:
        text_config = dict(model_type="t5", d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2,
                           num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=VOCAB),
        text_config=text_config, num_query_tokens=4, image_token_index=IMAGE_TOKEN)
    return _roundtrip(Blip2ForConditionalGeneration, cfg, tmp_path)


def randomise_peft(model) -> None:
    """Give LoRA B and adapter up-projections non-zero values so the added branches change the output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; NaN anywhere gives inf so it never passes a bound."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
