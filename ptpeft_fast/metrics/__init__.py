"""Evaluation metrics: captioning (CIDEr-D, BLEU-4, METEOR, ROUGE-L) and VQAv2 accuracy."""
from .caption import caption_metrics, java_available, simple_ptb_tokenize
from .vqa import normalize_answer, vqa_accuracy, vqa_score

__all__ = ["caption_metrics", "java_available", "simple_ptb_tokenize", "normalize_answer",
           "vqa_accuracy", "vqa_score", "compute_metrics"]


def compute_metrics(task: str, predictions: dict, references: dict, use_java: bool | None = None) -> dict:
    """Metrics for ``task`` ("caption" or "vqa") as a flat dict of floats (percent)."""
    if task == "vqa":
        return vqa_accuracy(predictions, references)
    return caption_metrics(predictions, references, use_java=use_java)
