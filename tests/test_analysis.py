"""ptpeft_fast.analysis: statistics, streaming accumulator, feature hooks, table and figure."""
from __future__ import annotations

import csv
import io
import math

import pytest
import torch

from ptpeft_fast.analysis import (
    SpectrumAccumulator,
    SpectrumStats,
    compare,
    extract_features,
    find_layers,
    plot,
    singular_values,
    spectrum_figure,
    spectrum_stats,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama built from a config, saved and loaded back (the real loading path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path).eval()


def python_stats(samples: list[torch.Tensor], tau: float = 0.9):
    """design §1 in plain Python floats, from per-sample float64 svdvals."""
    spectra = [torch.linalg.svdvals(s.double()).tolist() for s in samples]
    K = max(len(s) for s in spectra)
    mean = [0.0] * K
    er = 0.0
    for s in spectra:
        tot = sum(s)
        p = [v / tot for v in s]
        for i, v in enumerate(p):
            mean[i] += v / len(spectra)
        er += math.exp(-sum(v * math.log(v) for v in p if v > 0)) / len(spectra)
    curve, acc = [], 0.0
    for v in mean:
        acc += v
        curve.append(acc)
    k = next((i + 1 for i, c in enumerate(curve) if c >= tau), K)
    return curve, k / K, er


def test_spectrum_stats_dataclass():
    x = torch.randn(4, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    st = spectrum_stats(x)
    curve, ratio, er = python_stats(list(x))
    assert isinstance(st, SpectrumStats) and st.n_samples == 4 and st.K == 6 and st.threshold == 0.9
    assert torch.allclose(st.curve, torch.tensor(curve, dtype=torch.float64), atol=1e-12, rtol=0)
    assert st.remaining_rank_ratio == ratio and st.effective_rank == pytest.approx(er, rel=1e-12)
    assert singular_values(x).shape == (4, 6)


def test_accumulator_streams_batches_of_different_shapes():
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(3, 5, 12, dtype=torch.float64, generator=gen), None),  # K = 5
        (torch.randn(2, 20, 12, dtype=torch.float64, generator=gen), torch.tensor([20, 4])),  # K = 12
        (torch.randn(4, 9, 12, dtype=torch.float64, generator=gen), torch.tensor([9, 1, 3, 8])),
    ]
    acc = SpectrumAccumulator(threshold=0.8)
    samples = []
    for x, lengths in batches:
        acc.update(x, lengths)
        for b in range(x.size(0)):
            samples.append(x[b, : (x.size(1) if lengths is None else int(lengths[b]))])
    st = acc.compute()
    curve, ratio, er = python_stats(samples, 0.8)
    assert st.n_samples == 9 and st.K == 12
    assert torch.allclose(st.curve, torch.tensor(curve, dtype=torch.float64), atol=1e-12, rtol=0)
    assert st.remaining_rank_ratio == ratio
    assert st.effective_rank == pytest.approx(er, rel=1e-12)

    # merge() of two halves gives the same statistics.
    a, b = SpectrumAccumulator(0.8), SpectrumAccumulator(0.8)
    a.update(*batches[0])
    b.update(*batches[1])
    b.update(*batches[2])
    a.merge(b)
    merged = a.compute()
    assert torch.allclose(merged.curve, st.curve, atol=1e-14) and merged.n_samples == 9


def test_accumulator_errors():
    with pytest.raises(ValueError, match="no samples"):
        SpectrumAccumulator().compute()
    with pytest.raises(ValueError, match="threshold"):
        SpectrumAccumulator(threshold=0)
    with pytest.raises(ValueError, match="NaN"):
        SpectrumAccumulator().update(torch.full((1, 2, 2), float("nan")))


def test_find_layers(tiny_llama):
    name, stack = find_layers(tiny_llama, "language")
    assert name == "model.layers" and len(stack) == 2
    assert find_layers(tiny_llama, "model.layers")[1] is stack
    with pytest.raises(ValueError, match="no layer stack found"):
        find_layers(tiny_llama, "vision")
    with pytest.raises(ValueError, match="no such submodule"):
        find_layers(tiny_llama, "model.nope")


def test_extract_features_matches_unpadded_runs(tiny_llama):
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(1, 128, (7,), generator=gen)
    b = torch.randint(1, 128, (4,), generator=gen)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1  # right padding: causal attention keeps real tokens unchanged
    loader = [{"input_ids": ids, "attention_mask": mask, "labels": ids}]
    (batch,) = list(extract_features(tiny_llama, loader, layer=-1))
    assert batch.features.shape == (2, 7, 64) and batch.lengths.tolist() == [7, 4]
    singles = [next(extract_features(tiny_llama, [t[None]])).features[0] for t in (a, b)]
    torch.testing.assert_close(batch.features[0], singles[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.features[1, :4], singles[1], atol=1e-5, rtol=1e-5)
    # Left padding: valid tokens are moved to the front, so lengths still describe the rows.
    left = {"input_ids": torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])]),
            "attention_mask": torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])}
    (lb,) = list(extract_features(tiny_llama, [left]))
    assert lb.lengths.tolist() == [7, 4]
    assert torch.isfinite(spectrum_stats(lb.features, lb.lengths).curve).all()


def test_extract_features_hooks_are_removed(tiny_llama):
    _, stack = find_layers(tiny_llama)
    before = len(stack[0]._forward_hooks)
    gen = extract_features(tiny_llama, [torch.randint(1, 128, (1, 5))] * 3, layer=0, max_batches=2)
    assert len(list(gen)) == 2
    assert len(stack[0]._forward_hooks) == before
    with pytest.raises(ValueError, match="out of range"):
        next(extract_features(tiny_llama, [torch.randint(1, 128, (1, 5))], layer=5))


def _stats(seed: int, scale: float) -> SpectrumStats:
    x = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(seed)) @ torch.diag(torch.logspace(0, scale, 8))
    return spectrum_stats(x)


def test_compare_table(tmp_path):
    stats = {"pretrained": _stats(0, 0.5), "lora": _stats(1, 2.0)}
    table = compare(stats)
    md = table.to_markdown()
    assert "| pretrained |" in md and "| lora |" in md and "τ=0.9" in md
    rows = list(csv.DictReader(io.StringIO(table.to_csv(tmp_path / "t.csv"))))
    assert [r["name"] for r in rows] == ["pretrained", "lora"]
    assert float(rows[0]["delta_effective_rank"]) == 0.0
    assert float(rows[1]["effective_rank"]) == pytest.approx(stats["lora"].effective_rank)
    assert float(rows[1]["delta_remaining_rank_ratio"]) == pytest.approx(
        stats["lora"].remaining_rank_ratio - stats["pretrained"].remaining_rank_ratio)
    assert (tmp_path / "t.csv").read_text() == table.to_csv()
    other = spectrum_stats(torch.randn(2, 4, 4), threshold=0.5)
    with pytest.raises(ValueError, match="different thresholds"):
        compare({"a": stats["lora"], "b": other})
    with pytest.raises(ValueError):
        compare({})


def test_plot_writes_png_with_one_curve_per_entry(tmp_path):
    from PIL import Image

    stats = {"pretrained": _stats(0, 0.5), "prefix": _stats(2, 1.0), "lora": _stats(1, 2.0)}
    path = plot(stats, tmp_path / "sub" / "fig.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    fig = spectrum_figure(stats)
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_gid() == "curve"]
    assert len(curves) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(s.startswith("pretrained") for s in labels) and any(s.startswith("lora") for s in labels)
    assert curves[0].get_xydata()[0].tolist() == [0.0, 0.0]  # starts at the origin
