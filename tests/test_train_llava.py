"""A local HF LMM folder other than BLIP-2: a tiny LLaVA (CLIP + Llama) saved with
save_pretrained, loaded by path, trained through both stages and evaluated."""
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ptpeft_fast.data import synthetic
from ptpeft_fast.models.tiny_blip2 import build_tokenizer
from ptpeft_fast.train.tasks import make_run

from _train_helpers import cfg, events

try:
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor


def _tiny_llava(path):
    tok = build_tokenizer(synthetic.vocabulary() + ["user", "assistant"])
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=2, eos_token_id=2,
                     max_position_embeddings=128)
    config = LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(path)


def test_local_llava_folder_two_stages(tmp_path):
    _tiny_llava(str(tmp_path / "llava"))
    out = str(tmp_path / "run")
    c = cfg(f"model.name={tmp_path / 'llava'}", "data.prompt=user : <image> {question} assistant :",
            "stage2.method=adapter", "stage1.lr=3e-2", "stage2.lr=3e-2", "eval.after_each_stage=false")
    rows = make_run(c, out).execute()
    assert [r["method"] for r in rows] == ["zero-shot", "PT-Adapter"]
    ev = events(out, "train")
    for stage in ("stage1", "stage2"):
        losses = [e["loss"] for e in ev if e["stage"] == stage]
        assert losses[-1] < losses[0], stage
