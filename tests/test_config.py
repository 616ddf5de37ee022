import json

import pytest

import ptpeft_fast as pf


def test_defaults_and_roundtrip(tmp_path):
    cfg = pf.PTPeftConfig()
    assert cfg.prefix.num_tokens == 10 and cfg.prefix.reparam == "mlp" and cfg.lora.r == 8 and cfg.adapter is None
    d = cfg.to_dict()
    assert pf.PTPeftConfig.from_dict(d) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert pf.PTPeftConfig.from_json(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("prefix:\n  num_tokens: 4\n  reparam: none\n"
                                     "lora: null\n"
                                     "adapter:\n  bottleneck: 8\n  style: parallel\n")
    y = pf.PTPeftConfig.from_yaml(tmp_path / "c.yaml")
    assert y.prefix.num_tokens == 4 and y.prefix.reparam == "none" and y.lora is None and y.adapter.style == "parallel"


@pytest.mark.parametrize("d, words", [
    ({"prefx": {}}, ["prefx", "allowed"]),
    ({"prefix": {"num_token": 3}}, ["prefix.num_token"]),
    ({"lora": {"r": 0}}, ["lora.r", "positive"]),
    ({"prefix": {"num_tokens": 0}}, ["prefix.num_tokens"]),
    ({"prefix": {"components": ["langauge"]}}, ["langauge", "language", "vision"]),
    ({"prefix": {"reparam": "deep"}}, ["prefix.reparam", "mlp-global"]),
    ({"adapter": {"style": "x"}}, ["adapter.style", "pfeiffer"]),
    ({"lora": {"dropout": 1.5}}, ["lora.dropout"]),
    ({"prefix": None, "lora": None}, ["nothing to patch"]),
    ({"backend": "cuda"}, ["backend", "triton"]),
])
def test_bad_values_name_the_key(d, words):
    with pytest.raises(ValueError) as e:
        pf.PTPeftConfig.from_dict(d)
    for w in words:
        assert w in str(e.value)


def test_newer_config_version_is_refused(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="newer"):
        pf.PTPeftConfig.from_json(p)
