"""nf4kit.BitsAndBytesConfig: transformers' fields and defaults, validation, serialisation."""
import inspect
import json

import pytest
import torch

from nf4kit import BitsAndBytesConfig

transformers = pytest.importorskip("transformers")


def test_fields_and_defaults_match_transformers():
    ours = inspect.signature(BitsAndBytesConfig.__init__).parameters
    theirs = inspect.signature(transformers.BitsAndBytesConfig.__init__).parameters
    for name, p in theirs.items():
        if name in ("self", "kwargs"):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, name
    a, b = BitsAndBytesConfig(), transformers.BitsAndBytesConfig()
    for name in theirs:
        if name not in ("self", "kwargs"):
            assert getattr(a, name) == getattr(b, name), name
    assert a.bnb_4bit_compute_dtype == torch.float32 and a.bnb_4bit_quant_storage == torch.uint8
    assert a.bnb_4bit_quant_type == "fp4" and a.bnb_4bit_blocksize == 64


def test_the_users_snippet():
    c = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                           bnb_4bit_use_double_quant=True)
    assert c.load_in_4bit and not c.load_in_8bit and c.quantization_method() == "nf4" and c.is_quantizable()
    assert c.bnb_4bit_compute_dtype == torch.float16
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"
    assert BitsAndBytesConfig().quantization_method() is None


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16", torch.bfloat16])
def test_compute_dtype_by_name(name):
    assert BitsAndBytesConfig(bnb_4bit_compute_dtype=name).bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, field", [
    (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit"),
    (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(bnb_4bit_quant_type="NF4"), "bnb_4bit_quant_type"),
    (dict(bnb_4bit_compute_dtype="float17"), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_compute_dtype="int8"), "bnb_4bit_compute_dtype"),
    (dict(bnb_4bit_quant_storage="uint4"), "bnb_4bit_quant_storage"),
    (dict(bnb_4bit_blocksize=48), "bnb_4bit_blocksize"),
    (dict(llm_int8_threshold="6"), "llm_int8_threshold"),
    (dict(llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BitsAndBytesConfig(**kwargs)


def test_bad_types_and_later_changes():
    with pytest.raises(TypeError, match="load_in_4bit"):
        BitsAndBytesConfig(load_in_4bit=1)
    with pytest.raises(TypeError, match="bnb_4bit_use_double_quant"):
        BitsAndBytesConfig(bnb_4bit_use_double_quant="yes")
    with pytest.raises(TypeError, match="unexpected"):
        BitsAndBytesConfig(load_in_3bit=True)
    c = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit"):
        c.load_in_4bit = True
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        c.update(bnb_4bit_quant_type="nf5")
    assert c.update(bnb_4bit_quant_type="nf4", not_a_field=1) == {"not_a_field": 1}


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
         bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_blocksize=128,
         llm_int8_skip_modules=["lm_head", "model.layers.0"]),
    dict(load_in_8bit=True, llm_int8_threshold=4.5, llm_int8_has_fp16_weight=True,
         llm_int8_enable_fp32_cpu_offload=True),
])
def test_dict_and_json_round_trip(kwargs):
    c = BitsAndBytesConfig(**kwargs)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON values
    assert BitsAndBytesConfig.from_dict(d) == c
    assert BitsAndBytesConfig.from_dict(json.loads(c.to_json_string())) == c
    assert BitsAndBytesConfig.from_dict(c.to_diff_dict()) == c
    assert d["quant_method"] == "nf4kit" and d["bits"] == c.bits
    # transformers routes any dict with a true load_in_4bit/8bit to bitsandbytes: never write one
    assert "load_in_4bit" not in d and "load_in_8bit" not in d


def test_from_transformers_bitsandbytes_dict():
    t = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True)
    c = BitsAndBytesConfig.from_dict(t.to_dict())
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_compute_dtype == torch.float16
    assert c.bnb_4bit_use_double_quant and c.bnb_4bit_blocksize == 64
    with pytest.raises(ValueError, match="quant_method"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq"})
    with pytest.raises(ValueError, match="unknown"):
        BitsAndBytesConfig.from_dict({"quant_method": "nf4kit", "bitz": 4})


def test_repr_is_readable():
    r = repr(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"))
    assert r.startswith("BitsAndBytesConfig(load_in_4bit=True")
    assert "bnb_4bit_quant_type='nf4'" in r and "torch.bfloat16" in r and "\n" not in r
