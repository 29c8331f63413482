"""The precision policy (nodes/core/precision.py): one decision for both trainers."""

from __future__ import annotations

import pytest
import torch
from core_package import core

precision = core("precision")
Caps = precision.DeviceCapabilities
AMPERE = Caps("cuda", bf16=True, fp16=True)
TURING = Caps("cuda", bf16=False, fp16=True)  # T4, RTX 20xx; V100 likewise
CPU = Caps("cpu", bf16=True, fp16=True)


def choose(requested, caps, compute=torch.float16, storage=torch.float16, **kw):
    return precision.choose_precision(requested, caps, compute, storage, **kw)


def test_auto_computes_in_the_models_own_dtype_and_scales_float16():
    p = choose("auto", AMPERE)
    assert p.compute_dtype == torch.float16 and p.loss_scaling and p.autocast and p.notes == ()
    p = choose("auto", AMPERE, compute=torch.bfloat16, storage=torch.bfloat16)
    assert p.compute_dtype == torch.bfloat16 and not p.loss_scaling
    p = choose("auto", CPU, compute=torch.float32, storage=torch.float16)
    assert p.compute_dtype == torch.float32 and not p.loss_scaling and not p.autocast


def test_asked_precision_is_used_on_the_cpu_too():
    assert choose("fp16", CPU).compute_dtype == torch.float16 and choose("fp16", CPU).loss_scaling
    assert choose("bf16", CPU).compute_dtype == torch.bfloat16 and not choose("bf16", CPU).loss_scaling
    assert choose("fp32", AMPERE).compute_dtype == torch.float32


def test_no_bfloat16_on_the_gpu_falls_back_to_scaled_float16_and_says_so():
    p = choose("bf16", TURING)
    assert p.compute_dtype == torch.float16 and p.loss_scaling
    assert any("no bfloat16 arithmetic" in n and "loss scaling" in n for n in p.notes)
    full = choose("auto", TURING, full=True, full_bf16=True)
    assert full.copy_dtype == torch.float32 and any("trained copy is float32" in n for n in full.notes)


def test_full_bf16_copy_computes_in_bfloat16_on_a_gpu():
    p = choose("auto", AMPERE, full=True, full_bf16=True)
    assert p.copy_dtype == torch.bfloat16 and p.compute_dtype == torch.bfloat16 and not p.loss_scaling
    p = choose("auto", CPU, compute=torch.float32, full=True, full_bf16=True)
    assert p.copy_dtype == torch.bfloat16 and p.compute_dtype == torch.float32, "the CPU computes float32 from the bf16 copy"
    assert choose("auto", AMPERE, full=True, full_bf16=False).copy_dtype == torch.float32


@pytest.mark.skipif(not precision.FP8_DTYPES, reason="this torch has no float8 dtypes")
def test_fp8_models_train_adapters_in_the_compute_dtype_and_refuse_full_fine_tuning():
    fp8 = precision.FP8_DTYPES[0]
    p = choose("auto", AMPERE, compute=torch.bfloat16, storage=fp8)
    assert p.compute_dtype == torch.bfloat16
    p = choose("auto", AMPERE, compute=fp8, storage=fp8)
    assert p.compute_dtype == torch.bfloat16, "fp8 is no compute dtype: the best the device has"
    with pytest.raises(ValueError, match=r"full fine-tuning of a model stored in float8.*LoRA"):
        choose("auto", AMPERE, compute=torch.bfloat16, storage=fp8, full=True)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16"):
        choose("fp64", AMPERE)
