"""Attention maps: equal to the model's ``output_attentions`` (and Hugging Face's); the self-contained HTML page
rendered in headless Chromium, driven through its layer/head picker, thumbnails and URL hash; the PNG; bad input."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess

import numpy as np
import pytest
import torch

from cdp_pipe import HEADLESS_FLAGS, Browser, find_chromium
from gpt2_jax.inspect import attention_html, attention_maps, plot_attention, write_attention_html
from gpt2_jax.inspect.attention_view import check_layer_head
from gpt2_jax.model import GPT2LMHeadModel
from gpt2_jax.tokenizer import GPT2Tokenizer
from hf_reference import hf_model
from inspect_helpers import TINY, peaked_params, run_cli

CONFIG = TINY.replace(n_layer=3, n_head=4, n_embd=32)
TEXT = "The quick brown fox jumps over the lazy dog. <b>Bold</b> &amp;\nnew line"
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium), so the HTML page is not "
                             "rendered; the page's data is still checked without a browser")


@pytest.fixture(scope="module")
def params():
    return peaked_params(CONFIG, seed=1)


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def maps(params, tok):
    return attention_maps(params, CONFIG, tok.encode(TEXT))


def test_maps_equal_output_attentions_and_hf(params, tok, maps):
    ids = tok.encode(TEXT)
    seq = len(ids)
    assert maps.attentions.shape == (CONFIG.n_layer, CONFIG.n_head, seq, seq)
    assert maps.attentions.dtype == np.float32
    out = GPT2LMHeadModel(CONFIG).apply({"params": params}, np.array([ids]), output_attentions=True)
    ours = np.stack([np.asarray(a[0]) for a in out.attentions])  # eager, while attention_maps is jitted: round-off
    np.testing.assert_allclose(maps.attentions, ours, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        theirs = hf_model(params, CONFIG)(torch.tensor([ids]), output_attentions=True).attentions
    np.testing.assert_allclose(maps.attentions, np.stack([a[0].numpy() for a in theirs]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.attentions.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert np.all(maps.attentions[..., np.triu_indices(seq, 1)[0], np.triu_indices(seq, 1)[1]] == 0)
    uniform = np.mean(1.0 / np.arange(1, seq + 1))  # mean row maximum of uniform causal attention
    assert maps.attentions.max(-1).mean() > 1.5 * uniform  # peaked weights: the maps are not uniform
    np.testing.assert_array_equal(maps.head(2, 3), maps.attentions[2, 3])


def _embedded(page: str) -> dict:
    block = re.search(r'<script id="attention-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


def test_page_is_self_contained_and_embeds_exact_maps(maps, tok):
    page = attention_html(maps, tok, title="a <title>", layer=1, head=2)
    data = _embedded(page)
    values = np.frombuffer(base64.b64decode(data["attentions"]), "<f4").reshape(maps.attentions.shape)
    np.testing.assert_array_equal(values, maps.attentions)
    assert data["tokens"] == [tok.decode([i]) for i in tok.encode(TEXT)]
    assert (data["layer"], data["head"], data["n_layer"], data["n_head"]) == (1, 2, 3, 4)
    assert "<b>" not in page.split('id="attention-data"')[1].split("</script>")[0]  # token text cannot end the block
    assert "a &lt;title&gt;" in page
    # nothing is fetched at view time
    assert not re.search(r"""(src|href)\s*=|https?://(?!www\.w3\.org)|@import|fetch\(|XMLHttpRequest""", page)


@needs_chromium
def test_page_in_chromium_picker_thumbnails_hash_and_screenshot(maps, tok, tmp_path):
    page = tmp_path / "attention.html"
    write_attention_html(page, maps, tok, layer=2, head=1)
    browser = Browser(CHROMIUM, tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        browser.wait_for("document.body && document.body.dataset.ready === '1'")

        def shown():
            return browser.evaluate("[Number(document.body.dataset.layer), Number(document.body.dataset.head)]")

        def cells():
            rows = browser.evaluate("""JSON.stringify(Array.from(document.querySelectorAll('#heatmap td.cell'))
                .map(td => [Number(td.dataset.q), Number(td.dataset.k), td.dataset.value,
                            td.classList.contains('masked'), getComputedStyle(td).backgroundColor]))""")
            return json.loads(rows)

        def check_cells(layer, head):
            expected = maps.attentions[layer, head]
            rendered = cells()
            assert len(rendered) == expected.size
            for q, k, value, masked, colour in rendered:
                assert float(value) == float(expected[q, k])  # the exact float32 the model computed
                assert masked == (k > q)
                if not masked:
                    alpha = float(re.match(r"rgba?\((?:[\d.]+, ){3}([\d.]+)\)", colour).group(1)) \
                        if colour.startswith("rgba") else 1.0
                    assert abs(alpha - expected[q, k]) <= 1 / 255 + 1e-6, (q, k, colour)

        assert shown() == [2, 1]  # the layer/head the page was written with
        check_cells(2, 1)

        # the picker
        for layer, head in [(0, 0), (1, 3), (2, 2)]:
            browser.evaluate(f"""(() => {{
                const l = document.getElementById('layer'), h = document.getElementById('head');
                l.value = '{layer}'; l.dispatchEvent(new Event('change'));
                h.value = '{head}'; h.dispatchEvent(new Event('change')); }})()""")
            assert shown() == [layer, head]
            check_cells(layer, head)
            assert browser.evaluate("location.hash") == f"#layer={layer}&head={head}"
            assert browser.evaluate("document.querySelector('#grid canvas.selected').id") == f"thumb-{layer}-{head}"
            assert browser.evaluate("document.getElementById('detail-title').textContent") == \
                f"layer {layer}, head {head}"
        assert not np.allclose(maps.attentions[0, 0], maps.attentions[1, 3])  # the switch really changes the cells

        # a thumbnail of the model view
        browser.evaluate("document.getElementById('thumb-1-0').click()")
        assert shown() == [1, 0]
        assert browser.evaluate("[document.getElementById('layer').value, document.getElementById('head').value]") \
            == ["1", "0"]
        check_cells(1, 0)

        # the URL hash, and an out-of-range one reported on the page
        browser.evaluate("location.hash = '#layer=0&head=3'")
        browser.wait_for("document.body.dataset.layer === '0' && document.body.dataset.head === '3'")
        check_cells(0, 3)
        browser.evaluate("location.hash = '#layer=7&head=1'")
        status = browser.wait_for("document.getElementById('status').className === 'error' && "
                                  "document.getElementById('status').textContent")
        assert 'layer "7" is out of range 0..2' in status
        assert shown() == [0, 1]

        shot = browser.screenshot(tmp_path / "screenshot.png")
    finally:
        browser.close()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("PIL.Image")
    pixels = np.asarray(image.open(tmp_path / "screenshot.png").convert("RGB")).astype(int)
    dark_blue = (np.abs(pixels - np.array([8, 81, 156])).sum(-1) < 60).sum()
    assert dark_blue > 500, "the heatmap cells were not painted"


@needs_chromium
def test_page_hash_selects_layer_and_head_in_dump_dom(maps, tok, tmp_path):
    page = tmp_path / "attention.html"
    write_attention_html(page, maps, tok)
    command = [CHROMIUM, *HEADLESS_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
               page.as_uri() + "#layer=1&head=2"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-layer="1"' in dom and 'data-head="2"' in dom
    found = {(int(q), int(k)): float(v) for q, k, v in
             re.findall(r'id="cell-(\d+)-(\d+)"[^>]*?data-value="([^"]+)"', dom)}
    seq = maps.attentions.shape[-1]
    assert len(found) == seq * seq
    for (q, k), value in found.items():
        assert value == float(maps.attentions[1, 2, q, k])
    assert html.escape("\u2423fox") in dom or "\u2423fox" in dom  # tokens label the rows and columns


def test_png_and_cli(monkeypatch, params, tok, maps, tmp_path):
    path = tmp_path / "head.png"
    plot_attention(maps, tok, path, layer=2, head=3)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"head 4 is out of range: the model has 4 heads, numbered 0..3"):
        plot_attention(maps, tok, tmp_path / "x.png", layer=0, head=4)
    with pytest.raises(ValueError, match=r"layer -1 is out of range"):
        maps.head(-1, 0)
    with pytest.raises(ValueError, match="layer"):
        check_layer_head(3, 0, 3, 4)

    # the command, on a saved tiny model
    from gpt2_jax.checkpoints.hf_directory import save_hf_directory

    model_dir = save_hf_directory(tmp_path / "model", params, CONFIG, tokenizer=tok)
    out = tmp_path / "out" / "attention.html"
    code, stdout, err = run_cli(monkeypatch, "attention", TEXT, "--model", str(model_dir), "--out", str(out),
                                "--layer", "1", "--head", "2")
    assert code == 0, err
    data = _embedded(out.read_text(encoding="utf-8"))
    assert (data["layer"], data["head"]) == (1, 2)
    np.testing.assert_array_equal(
        np.frombuffer(base64.b64decode(data["attentions"]), "<f4").reshape(maps.attentions.shape), maps.attentions)
    png = tmp_path / "l2h0.png"
    code, stdout, err = run_cli(monkeypatch, "attention", TEXT, "--model", str(model_dir), "--png", "--out", str(png),
                                "--layer", "2", "--head", "0")
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG"

    for argv, message in [
        (["--png", "--layer", "3"], "layer 3 is out of range: the model has 3 layers, numbered 0..2"),
        (["--head", "9"], "head 9 is out of range: the model has 4 heads, numbered 0..3"),
        (["--out", str(tmp_path)], "it is a directory"),
        (["--out", str(png / "page.html")], "is not a directory"),
    ]:
        code, _, err = run_cli(monkeypatch, "attention", TEXT, "--model", str(model_dir), *argv)
        assert code == 2 and message in err and "Traceback" not in err, err
    code, _, err = run_cli(monkeypatch, "attention", "word " * 40, "--model", str(model_dir),
                           "--out", str(tmp_path / "long.html"))
    assert code == 2 and "longer than the model's context of n_positions=32" in err
    assert not (tmp_path / "long.html").exists()
