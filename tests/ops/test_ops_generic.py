"""The checks every op family gets, written once and fed by each family's cases module
(``<family>_cases.py``, see checks.py): values and gradients against the float64 plain-torch
reference, the low-precision rule in float32, gradcheck, torch.library's opcheck, and wrong
arguments raising an error that names the argument."""

import attention_cases
import cross_entropy_cases
import linear_act_cases
import linear_glu_cases
import pytest
import torch
from checks import assert_float64_matches, assert_low_precision_rule, params
from torch.library import opcheck

FAMILIES = {"linear_act": linear_act_cases, "linear_glu": linear_glu_cases,
            "cross_entropy": cross_entropy_cases, "attention": attention_cases}


CASES = {family: module.cases() for family, module in FAMILIES.items()}


def all_cases(check):
    return [p for family, cases in CASES.items()
            for p in params(family, [c for c in cases if check in c.checks])]


def all_of(kind):
    return [p for family, module in FAMILIES.items()
            if hasattr(module, kind) for p in params(family, getattr(module, kind)())]


@pytest.mark.parametrize("case", all_cases("float64"))
def test_float64_matches_reference(case):
    assert_float64_matches(case)


@pytest.mark.parametrize("case", all_cases("float32"))
def test_float32_low_precision_rule(case):
    assert_low_precision_rule(case, torch.float32)


@pytest.mark.parametrize("case", all_cases("gradcheck"))
def test_gradcheck_float64(case):
    torch.manual_seed(case.seed)
    assert torch.autograd.gradcheck(case.ours, case.inputs(), **case.gradcheck)


@pytest.mark.parametrize("check", all_of("opchecks"))
def test_opcheck(check):
    kwargs = {} if check.test_utils is None else {"test_utils": check.test_utils}
    opcheck(check.op, check.args(), **kwargs)


@pytest.mark.parametrize("bad", all_of("bad_inputs"))
def test_bad_input(monkeypatch, bad):
    if bad.guard is not None:
        bad.guard(monkeypatch)
    with pytest.raises(bad.error, match=bad.pattern):
        bad.call()
