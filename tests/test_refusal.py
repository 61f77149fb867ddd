"""Refusals are data (turbofx/refusal.py): a stable code plus prose, recorded per node by passes."""
import pytest
import torch

from turbofx.codegen.gemm import GemmSpec, gemm_refusal
from turbofx.passes.manager import Fuel, PassRecord
from turbofx.refusal import Refusal, Refused


def test_refusal_prints_code_then_detail_and_keeps_its_code_in_context():
    r = Refusal("shape-differs", "shape differs from the region's domain")
    assert str(r) == "shape-differs: shape differs from the region's domain"
    inner = r.within("not fused into region 3")
    assert inner.code == "shape-differs" and inner.detail == "not fused into region 3: " + r.detail


@pytest.mark.parametrize("bad", ["", "Shape differs", "two words", " dtype"])
def test_codes_are_short_lower_case_ids(bad):
    with pytest.raises(ValueError, match="refusal code"):
        Refusal(bad, "x")


def test_pass_records_take_typed_refusals_only():
    rec = PassRecord("p")
    rec.refuse("n1", Fuel(limit=2).refusal)
    rec.refuse("n2", Refusal("dtype", "float64"))
    rec.refuse("n3", Refusal("dtype", "int8"))
    assert rec.refused[0] == Refused("n1", Refusal("rewrite-budget", "rewrite budget spent (max_rewrites=2)"))
    assert rec.refusal_counts() == {"dtype": 2, "rewrite-budget": 1}
    assert "3 refused (2 dtype, 1 rewrite-budget)" in rec.summary()
    with pytest.raises(TypeError, match="Refusal"):
        rec.refuse("n4", "free-form prose")


def test_gemm_refusals_are_the_shared_type():
    assert isinstance(gemm_refusal(GemmSpec(torch.int8)), Refusal)
