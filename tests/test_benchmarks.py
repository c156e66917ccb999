"""The roofline arithmetic of benchmarks/: FLOPs counted by torch against the analytic count of a
BERT forward pass, which also proves that the extractor stops after the last layer's queries and keys."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import eager_copy, tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import roofline  # noqa: E402


def bert_flops(batch, seq, hidden, layers, inner):
    """Matrix FLOPs of a BERT encoder forward, written out: per layer q/k/v/o projections, the two MLP
    matrices, q.k and attention x v; then the pooler on the first token."""
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 2 * 2 * batch * seq * seq * hidden
    return layers * per_layer + 2 * batch * hidden * hidden


def test_count_flops_equals_the_analytic_count_for_sdpa_and_eager():
    model = tiny_bert(layers=3, heads=4, hidden=32)
    ids = torch.randint(5, 100, (3, 40))
    expected = bert_flops(3, 40, 32, 3, 64)
    with torch.inference_mode():
        assert roofline.count_flops(lambda: model(input_ids=ids)) == expected  # SDPA (CPU flash kernel mapped)
        assert roofline.count_flops(lambda: eager_copy(model)(input_ids=ids)) == expected  # eager bmm


def test_extractor_flops_stop_at_the_last_layers_queries_and_keys():
    from attnlab import extract_attention

    batch, seq, hidden, layers, inner, heads = 3, 40, 32, 3, 64, 4
    model = tiny_bert(layers=layers, heads=heads, hidden=hidden)
    ids = torch.randint(5, 100, (batch, seq))
    qpos = torch.tensor([[5], [17], [30]])
    flops = roofline.count_flops(lambda: extract_attention(model, ids, query_positions=qpos))
    full_layers = (layers - 1) * (bert_flops(batch, seq, hidden, 1, inner) - 2 * batch * hidden * hidden)
    last_layer_qkv = 3 * 2 * batch * seq * hidden * hidden  # HF projects q, k and v before the attention call
    recorder_rows = layers * 2 * batch * 1 * seq * hidden  # one [1, d] x [d, S] product per head and layer
    assert flops == full_layers + last_layer_qkv + recorder_rows


def test_datasheet_peaks_pick_the_most_specific_name():
    assert roofline.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert roofline.datasheet_peak("NVIDIA H100 PCIe", "bfloat16") == 756.5
    assert roofline.datasheet_peak("NVIDIA H100 NVL", "tf32") == 417.5
    assert roofline.datasheet_peak("NVIDIA H200", "float32") == 66.9
    assert roofline.datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert roofline.datasheet_peak("cpu (2 threads)", "bfloat16") is None


def test_roofline_fractions():
    r = roofline.roofline(flops=3e12, seconds=0.5, measured_peak=12.0, datasheet=24.0)
    assert r == {"tflops": 6.0, "of_measured_peak": 0.5, "of_datasheet_peak": 0.25}
    assert roofline.roofline(1e12, 1.0, 2.0, None)["of_datasheet_peak"] is None


def test_measured_matmul_peak_is_a_positive_rate():
    rate = roofline.measured_matmul_peak(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert 0 < rate < 100  # TFLOP/s: a CPU core does far less than 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_count_flops_on_cuda_counts_the_sdpa_kernels():
    model = tiny_bert(layers=3, heads=4, hidden=32).cuda()
    ids = torch.randint(5, 100, (3, 40), device="cuda")
    with torch.inference_mode():
        assert roofline.count_flops(lambda: model(input_ids=ids)) == bert_flops(3, 40, 32, 3, 64)
