"""Evaluation: generation and last-layer features of a (patched) model, the recorded result
row of a phase, and the report built from the rows."""
from __future__ import annotations

import torch

from ..stages import set_stage
from . import report, run_folder
from .fsdp import root_unsharded
from .task import EvalResult, RunContext

__all__ = ["set_eval", "StopWhenCutIsFinal", "generate", "lm_features", "record_eval", "eval_rows", "write_report"]


def set_eval(model: torch.nn.Module, patched: bool) -> None:
    """Inference mode: nothing requires gradients, dropout off."""
    if patched:
        set_stage(model, "eval")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()


def echoed_prompt_length(out: torch.Tensor, prompt: torch.Tensor) -> int:
    """How many leading tokens of ``generate``'s output are the prompt: its length for a decoder-only
    model (which returns prompt + continuation), 0 for one that returns the continuation alone."""
    n = prompt.shape[1]
    return n if out.shape[1] >= n and torch.equal(out[:, :n].cpu(), prompt.cpu()) else 0


class StopWhenCutIsFinal:
    """A ``StoppingCriteria`` that ends a sequence once its continuation, with the leading whitespace
    stripped as the prediction will be, contains the stop text: from then on the prediction cut at
    it cannot change. (transformers' ``stop_strings`` would stop at a newline the model writes
    first, before any answer, where the cut prediction keeps the line after it.)"""

    def __init__(self, tok, stop: str, prompt: torch.Tensor):
        self.tok, self.stop, self.prompt = tok, stop, prompt
        self.skip: int | None = None  # prompt tokens before the continuation, found at the first step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.skip is None:
            self.skip = echoed_prompt_length(input_ids, self.prompt)
        texts = self.tok.batch_decode(input_ids[:, self.skip:], skip_special_tokens=True)
        return torch.tensor([self.stop in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(run: RunContext, records_idx: list[int]) -> dict[str, str]:
    """Greedy/beam generation for the evaluation records ``records_idx``; ``{record id: text}``, each
    stripped and cut at ``eval.stop_at`` when set."""
    ev = run.cfg["eval"]
    tok = run.eval_collate.tok
    preds: dict[str, str] = {}
    for s in range(0, len(records_idx), ev["batch_size"]):
        items = [run.data.eval[i] for i in records_idx[s:s + ev["batch_size"]]]
        batch = run.eval_collate(items)
        inp = run.model_inputs(batch)
        # FSDP: ranks stop together (synced_gpus) so each runs the same sharded forwards
        # a sequence stops once its cut prediction is final (what follows would be cut anyway)
        stop = ({"stopping_criteria": [StopWhenCutIsFinal(tok, ev["stop_at"], inp["input_ids"])]}
                if ev["stop_at"] else {})
        with run.autocast(), root_unsharded(run.model):
            out = run.model.generate(**inp, max_new_tokens=ev["max_new_tokens"], num_beams=ev["num_beams"],
                                     do_sample=False, pad_token_id=tok.pad_token_id, synced_gpus=run.fsdp, **stop)
        out = out[:, echoed_prompt_length(out, inp["input_ids"]):]
        for rid, text in zip(batch["record_ids"], tok.batch_decode(out, skip_special_tokens=True), strict=True):
            text = text.strip()
            if ev["stop_at"]:  # a stop string: what a model that does not end with EOS writes after the answer
                text = text.split(ev["stop_at"], 1)[0].strip()
            preds[rid] = text
    return preds


@torch.no_grad()
def lm_features(run: RunContext, n: int) -> list[torch.Tensor]:
    """Last-layer language-model hidden states of the first ``n`` evaluation inputs (image +
    prompt, and the first reference target with ``eval.spectrum_text: prompt+target``; padding
    removed). For an encoder-decoder language model (Florence-2) these are the
    ENCODER's last hidden states: the encoder is what reads image + prompt (the decoder would
    only see its start token here)."""
    feats = []
    bs = run.cfg["eval"]["batch_size"]
    idx = list(range(min(n, len(run.data.eval))))
    with_target = run.cfg["eval"]["spectrum_text"] == "prompt+target"
    for s in range(0, len(idx), bs):
        items = [run.data.eval[i] for i in idx[s:s + bs]]
        # prompt+target: the record's first reference after the prompt, as training reads it
        batch = (run.target_collate([(rec, img, rec.train_target(0)) for rec, img in items]) if with_target
                 else run.eval_collate(items))
        inp = run.model_inputs(batch)
        with run.autocast():
            out = run.model(**inp, output_hidden_states=True)
        lm = getattr(out, "language_model_outputs", None)
        if getattr(out, "encoder_last_hidden_state", None) is not None:
            hs = out.encoder_last_hidden_state.float().cpu()
        else:
            hs = (lm.hidden_states if lm is not None and getattr(lm, "hidden_states", None) is not None
                  else out.hidden_states)[-1].float().cpu()
        mask = inp["attention_mask"].bool().cpu()
        for h, m in zip(hs, mask, strict=True):
            feats.append(h[m[-h.shape[0]:]])
    return feats


def record_eval(out: str, phase: str, label: str, kind: str, result: EvalResult, trainable: int,
                seconds: float) -> tuple[dict, str]:
    """Write the phase's predictions; returns the result row (for the run's records) and the log
    line that shows it."""
    row = {"event": "eval", "phase": phase, "method": label,
           "metrics": {k: v for k, v in result.metrics.items() if k != "n"}, "n": result.metrics.get("n"),
           "spectrum": result.spectrum, "trainable": trainable, **result.extra, "seconds": round(seconds, 2)}
    run_folder.write_predictions(out, phase, result.predictions)
    shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in row["metrics"].items() if k in report.metric_names(kind))
    spec = result.spectrum
    if spec:
        shown += f", rank ratio {spec['remaining_rank_ratio']:.3f}, eff. rank {spec['effective_rank']:.2f}"
    return row, f"eval {label}: {shown}{result.note} ({row['seconds']}s)"


def eval_rows(out: str, phases: list[str]) -> list[dict]:
    """The evaluation rows of the run's records (the latest per phase, in phase order)."""
    by_phase = {rec["phase"]: rec for rec in run_folder.read_records(out, "eval")}
    return [by_phase[ph] for ph in phases if ph in by_phase]


def write_report(out: str, rows: list[dict], task: str, tau: float, title: str,
                 notes: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """Write ``results.md`` (and ``spectrum.png`` when rows carry spectra); returns their paths.
    ``notes``: lines listed under the title."""
    listed = "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
    md = f"# {title}\n\n" + listed + report.results_table(rows, report.metric_names(task))
    curves = {r["method"]: r["spectrum"]["curve"] for r in rows if r.get("spectrum")}
    png = None
    if curves:
        png = report.plot_spectra(curves, run_folder.spectrum_path(out), tau)
        md += f"\nRemaining-rank ratio: smallest k/K whose cumulative normalised singular-value mass ≥ {tau}; " \
              "effective rank: exp(entropy) of each sample's normalised spectrum, averaged over samples " \
              "(last-layer language features of the evaluation inputs).\n\n![spectrum](spectrum.png)\n"
    return run_folder.write_results(out, md), png
