"""Result objects render as HTML in Jupyter (``_repr_html_``): the numbers of the result, its verdict, nothing
from a model's files left unescaped."""

import html
import re

import numpy as np
import pytest
from conftest import save_tiny_mlm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bert_tokenizer):
    """A small random BERT masked LM with bert-base-uncased's tokenizer."""
    from attnlab.core.models import load_model

    folder = save_tiny_mlm(tmp_path_factory.mktemp("nb") / "tiny", bert_tokenizer)
    return load_model(str(folder), masked_lm=True, device="cpu")


def _cells(page: str, caption: str) -> list[str]:
    """The numbers in the table captioned ``caption``, row by row."""
    table = page[page.index(html.escape(caption)):]
    table = table[:table.index("</table>")]
    return re.findall(r"<td[^>]*>([^<]*)</td>", table)


def test_induction_result_shows_each_map_and_its_verdict():
    """The planted circuit's induction head L1H0 is named for 'prev': its cell shows its mean and is framed."""
    from attnlab.induction.experiment import InductionConfig
    from attnlab.induction.maps import compute
    from attnlab.core.models import wrap_model
    from planted import planted_induction_circuit

    result = compute(InductionConfig(model="planted", seq_len=25, trials=24), wrap_model(planted_induction_circuit()))
    page = result._repr_html_()
    st = result.stats["prev"]
    cells = _cells(page, "prev: previous instance of the masked token")
    assert cells == [f"{v:.3f}" for v in st.mean.ravel()]
    assert float(cells[2]) > 0.5  # L1H0
    table = page[page.index("prev: previous instance"):page.index("before: token before")]
    assert table.count("outline") == 1 and "prev: L1H0 (" in page  # named by the verdict, and only it framed
    assert "chance" in page and "lift" in page


def test_heads_and_text_attention_render_their_numbers(tiny):
    from attnlab.circuits.experiment import HeadsConfig
    from attnlab.circuits.heads import compute as heads
    from attnlab.text.attention import compute as attention
    from attnlab.text.experiment import AttentionConfig

    result = heads(HeadsConfig(model=tiny.name, trials=2, detector_trials=1, seq_len=20, ablation=False), tiny)
    page = result._repr_html_()
    for name, values in result.scores.items():
        cells = _cells(page, name)
        shown = [np.nan if c == "-" else float(c) for c in cells]
        assert np.allclose(shown, np.round(np.asarray(values, dtype=float).ravel(), 3), atol=6e-4, equal_nan=True)
    text = attention(AttentionConfig(model=tiny.name, text="the cat sat on the <b>mat</b>"), tiny)
    page = text._repr_html_()
    assert "<b>" not in page.replace("<b style='font-size:12px'>", "")  # token text escaped, never markup
    assert page.count("L0") >= 1 and all(html.escape(t) in page for t in text.tokens)
