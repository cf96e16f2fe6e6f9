"""Issue 10 through the Python API: poisoned and inconsistent checkpoints are refused at load
(naming file and tensor), bad values give one-line InputErrors naming the value, non-finite
logits stop generation naming dtype and step, and every metric treats NaN as a failure."""
from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

import hal
from hal import probing
from hal.errors import CheckpointError, ConfigError, DeviceUnavailable, InputError, NonFiniteError
from model.checkpoint import INDEX, SINGLE
from model.safetensors_mmap import SafetensorsFile, write_safetensors
from model.synthetic import write_checkpoint
from validation import metrics
from validation.drift import layer_drift, summarize_drift
from validation.passrule import Check, Thresholds, verdict


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, change, file=SINGLE):
    f = SafetensorsFile(path / file)
    tensors = {name: f.tensor(name).clone() for name in f.entries}
    f.close()
    change(tensors)
    write_safetensors(path / file, tensors)


def _poke(name, index, value):
    def change(tensors):
        tensors[name].view(-1)[index] = value
    return change


@pytest.mark.parametrize(("name", "index", "value", "dtype", "needle"), [
    ("model.embed_tokens.weight", 5, float("nan"), "float32", r"\(first: nan at \[0, 5\]\)"),
    ("model.layers.2.mlp.down_proj.weight", 130, float("inf"), "float32", r"\(first: inf at \[0, 130\]\)"),
    ("model.layers.1.input_layernorm.weight", 0, float("-inf"), "bfloat16", "in bfloat16"),
    ("model.norm.weight", 3, 1e6, "float16", r"in float16 \(first: inf"),  # finite in the file, overflows
])
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path, tiny_checkpoint, name, index, value, dtype,
                                                        needle):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    _rewrite(ckpt, _poke(name, index, value))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 non-finite value.*{needle}") as info:
        hal.load_model(ckpt, "cpu", dtype)
    assert str(ckpt / SINGLE) in str(info.value)


def test_non_finite_gptq_scale_is_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "g", "tiny", seed=0, quantize_gptq=True)
    _rewrite(ckpt, _poke("model.layers.1.mlp.up_proj.scales", 0, float("nan")))
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.1.mlp.up_proj.weight' holds \d+ non-finite"):
        hal.load_model(ckpt, "cpu", "float32")


def test_sharded_tensor_in_two_shards_or_missing_from_the_index(tmp_path, tiny_checkpoint):
    ckpt = write_checkpoint(tmp_path / "s", "tiny", seed=0, shards=2)
    index = json.loads((ckpt / INDEX).read_text())
    first, second = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == second)
    twice = _copy(ckpt, tmp_path / "twice")
    donor = SafetensorsFile(ckpt / second)
    copy = donor.tensor(moved).clone()
    donor.close()
    _rewrite(twice, lambda t: t.update({moved: copy}), first)
    with pytest.raises(CheckpointError, match=f"tensor '{moved}' is stored in two shards"):
        hal.load_model(twice, "cpu")
    unlisted = _copy(ckpt, tmp_path / "unlisted")
    _rewrite(unlisted, lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(3)}), first)
    with pytest.raises(CheckpointError,
                       match="'model.layers.0.mlp.bias' is stored in this shard but not listed"):
        hal.load_model(unlisted, "cpu")


@pytest.mark.parametrize("layers", [10**6, 10**12])
def test_absurd_layer_count_is_refused_before_building_the_tensor_table(tmp_path, tiny_checkpoint, layers):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (ckpt / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"num_hidden_layers={layers} needs at least .* holds 38"):
        hal.load_model(ckpt, "cpu")
    assert time.perf_counter() - start < 20  # 10**6 layers took minutes and ~GBs building the table


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
    ({"top_p": float("nan")}, "top_p must be a finite number, got nan"),
    ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
    ({"seed": 2**70}, f"seed must be in \\[0, {2**64 - 1}\\], got {2**70}"),
    ({"seed": -1}, "seed must be in"),
    ({"seed": "7"}, "seed must be an integer, got '7'"),
    ({"do_sample": "no"}, "do_sample must be True, False or None, got 'no'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"prefill_chunk": 1.5}, "prefill_chunk must be an integer, got 1.5"),
    ({"eos_token_id": 10**6}, r"eos_token_id must be in \[-1, 1023\], got 1000000"),
    ({"eos_token_id": [2, -5]}, r"eos_token_id must be in \[-1, 1023\], got -5"),
    ({"input_ids": [1, 2, 3]}, r"got a flat list of ints \[1, 2, 3\]"),
    ({"input_ids": "hello"}, "got str"),
    ({"input_ids": [[1, 2], 3]}, "got an entry 3"),
])
def test_bad_generation_values_name_the_value(tiny_model, kwargs, needle):
    kwargs = {"input_ids": [[1, 2, 3]], **kwargs}
    with pytest.raises(InputError, match=needle):
        tiny_model.generate(kwargs.pop("input_ids"), kwargs.pop("max_new_tokens", 2), **kwargs)


def test_legitimate_edge_values_are_accepted(tiny_model):
    out = tiny_model.generate([[1, 2, 3]], 2, do_sample=True, seed=2**64 - 1)
    assert out == tiny_model.generate([[1, 2, 3]], 2, do_sample=True, seed=2**64 - 1)  # still deterministic
    assert len(tiny_model.generate(torch.tensor([1, 2, 3]), 2, do_sample=False)[0]) == 2


def test_non_finite_logits_stop_generation_naming_step_and_dtype(tiny_model, monkeypatch):
    # poisoned in the logits op, which the prompt's forward and every decode step call (the CPU
    # decode steps run through model/fast_decode.py, not model.forward)
    real = tiny_model.ops.logits
    calls = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out[..., 7] = float("nan")
        return out

    monkeypatch.setattr(tiny_model.ops, "logits", poisoned)
    with pytest.raises(NonFiniteError, match=r"logits turned non-finite \(NaN\) at step 2 .* in float32"):
        tiny_model.generate([[1, 2, 3]], 6, do_sample=False)


def test_float16_overflow_stops_generation_where_bfloat16_runs(tmp_path, tiny_checkpoint):
    """Weights finite in both dtypes (|w| < 800), activations past float16's 65504."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")

    def scale(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"] *= 3000
        tensors["model.layers.1.mlp.up_proj.weight"] *= 30
    _rewrite(ckpt, scale)
    assert len(hal.load_model(ckpt, "cpu", "bfloat16").generate([[1, 5, 9]], 3, do_sample=False)[0]) == 3
    with pytest.raises(NonFiniteError, match=r"at step 0 .* in float16; float16 overflows"):
        hal.load_model(ckpt, "cpu", "float16").generate([[1, 5, 9]], 3, do_sample=False)


@pytest.mark.parametrize(("device", "error", "needle"), [
    (0, InputError, "device must be a string .* got 0"),
    ("", InputError, "device '' is empty"),
    ("  ", InputError, "is empty"),
    (torch.device("cuda", 1), DeviceUnavailable, "only index 0"),
])
def test_bad_device_values(tiny_checkpoint, device, error, needle):
    with pytest.raises(error, match=needle):
        hal.load_model(tiny_checkpoint, device)


def test_torch_device_is_accepted(tiny_checkpoint):
    model = hal.load_model(tiny_checkpoint, torch.device("cpu"))
    assert model.device == torch.device("cpu")
    assert probing.resolve(torch.device("cpu", 0)) == "cpu"


@pytest.mark.parametrize(("variable", "value", "needle"), [
    ("HAL_DEVICE", "gpu", "HAL_DEVICE='gpu': unknown device 'gpu'"),
    ("HAL_DISABLE_BACKENDS", "cuda,nvidia", "HAL_DISABLE_BACKENDS='cuda,nvidia': unknown backend 'nvidia'"),
])
def test_bad_environment_values_name_the_variable(tiny_checkpoint, monkeypatch, variable, value, needle):
    monkeypatch.setenv(variable, value)
    with pytest.raises((InputError, DeviceUnavailable), match=needle):
        hal.load_model(tiny_checkpoint, "auto")


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"rms_nrom": lambda *a: None}, "op_overrides: unknown op 'rms_nrom'"),
    ({"rms_norm": 3}, "op_overrides: 'rms_norm' must map to a callable, got 3"),
])
def test_bad_op_overrides(tiny_checkpoint, overrides, needle):
    with pytest.raises(InputError, match=needle):
        hal.load_model(tiny_checkpoint, "cpu", op_overrides=overrides)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("temperature", -1, "field 'temperature' must be >= 0, got -1"),
    ("eos_token_id", [2, 5000],
     r"field 'eos_token_id' must be < vocab_size=1024 \(config.json\), got \[2, 5000\]"),
])
def test_generation_config_errors_name_the_file(tmp_path, tiny_checkpoint, field, value, needle):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    path = ckpt / "generation_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=needle) as info:
        hal.load_model(ckpt, "cpu")
    assert str(info.value).startswith(str(path))


# Metrics: NaN anywhere is a failure. The references are hand-made distributions.
P = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02], dtype=torch.float64)
NAN = torch.full_like(P, float("nan"))


@pytest.mark.parametrize(("ref", "dev"), [(P, NAN), (NAN, NAN), (NAN, P)],
                         ids=["dev-nan", "both-nan", "ref-nan"])
def test_every_metric_fails_on_nan(ref, dev):
    m = metrics.position_metrics(ref, dev, 5, 0.02)
    assert not m.top1_match and not m.top5_inclusion and m.topk_overlap == 0 and not m.near_tie
    assert m.kl == math.inf and m.top1_prob_rel_err == math.inf
    assert all(e == math.inf for e in m.topk_abs_errors)
    summary = metrics.summarize([m, metrics.position_metrics(P, P, 5, 0.02)], ["poisoned", "clean"], 5)
    assert summary["top1_match_rate"] == 0.5 and summary["kl_mean"] == math.inf
    assert summary["top1_prob_rel_err_max_prompt"] == "poisoned"
    clean = metrics.position_metrics(P, P, 5, 0.02)
    floor = metrics.summarize([clean, clean], ["a", "b"], 5)
    floor["top1_mismatch_rate"] = metrics.mismatch_rate([clean, clean], 0.02)
    summary["top1_mismatch_rate"] = metrics.mismatch_rate([m, clean], 0.02)
    judged = verdict(summary, {"weights": floor}, Thresholds(), checks=[Check("p", m.top1_match, m.near_tie)])
    failed = {v.metric for v in judged.metrics if not v.passed}
    assert not judged.passed and {"kl_mean", "top1_prob_rel_err_mean"} <= failed


def test_clean_metrics_are_unchanged():
    dev = torch.tensor([0.45, 0.35, 0.1, 0.05, 0.03, 0.02], dtype=torch.float64)
    m = metrics.position_metrics(P, dev, 5, 0.02)
    assert m.top1_match and m.topk_overlap == 5
    assert m.kl == pytest.approx(float((P * (P / dev).log()).sum()))
    assert m.top1_prob_rel_err == pytest.approx(0.1)


def test_drift_names_the_first_non_finite_layer():
    ref = [torch.ones(1, 2, 4) * (i + 1) for i in range(5)]
    dev = [r.clone() for r in ref]
    dev[1] += 0.001
    dev[3][0, 1, 2] = float("nan")
    dev[4][:] = float("inf")
    drift = layer_drift(ref, dev)
    assert drift[3] == math.inf and drift[4] == math.inf and drift[1] == pytest.approx(0.001 / 2, rel=1e-3)
    summary = summarize_drift([drift, layer_drift(ref, ref)], threshold=0.01)
    assert summary.first_non_finite == "layer 2" and summary.first_over == "layer 2"
    assert summary.as_dict()["first_layer_non_finite"] == "layer 2"
    hf_like = layer_drift([*ref[:-1], None], dev[:-1] + [dev[-1]])
    assert math.isnan(hf_like[-1])  # not comparable stays n/a, not a failure
