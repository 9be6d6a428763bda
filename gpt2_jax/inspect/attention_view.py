"""Attention maps of every layer and head, as a self-contained HTML page or a single PNG heatmap.

The page (in the spirit of bertviz's model view) embeds the maps as JSON and needs no network at view time: a
grid of thumbnails shows every layer x head; a layer / head picker (or a click on a thumbnail, or the URL hash
``#layer=L&head=H``) shows one map as a token-to-token table, queries down the side and keys along the top.
Layers and heads are numbered from 0.

    >>> maps = attention_maps(params, config, tokenizer.encode("The quick brown fox"))
    >>> write_attention_html("attention.html", maps, tokenizer)
    >>> plot_attention(maps, tokenizer, "l5h1.png", layer=5, head=1)
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..atomic import atomic_write_path
from ..config import GPT2Config
from ._common import check_output_path, forward, ids_array, to_host, token_labels


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities of one sequence.

    Attributes:
        input_ids: ``[seq]`` the input tokens.
        attentions: ``[n_layer, n_head, seq, seq]`` float32; ``attentions[l, h, q, k]`` is how much query position
            ``q`` attends to key position ``k`` (rows sum to 1, zero above the diagonal).
    """

    input_ids: np.ndarray
    attentions: np.ndarray

    @property
    def n_layer(self) -> int:
        return self.attentions.shape[0]

    @property
    def n_head(self) -> int:
        return self.attentions.shape[1]

    def head(self, layer: int, head: int) -> np.ndarray:
        """The ``[seq, seq]`` map of one layer and head (0-based), with a clear error when out of range."""
        check_layer_head(layer, head, self.n_layer, self.n_head)
        return self.attentions[layer, head]


jax.tree_util.register_dataclass(AttentionMaps, data_fields=["input_ids", "attentions"], meta_fields=[])  # jit-returnable


def check_layer_head(layer: int | None, head: int | None, n_layer: int, n_head: int) -> None:
    """Raise ValueError naming the valid range when ``layer`` or ``head`` (0-based; None = not given) is outside
    it."""
    for name, value, count in (("layer", layer, n_layer), ("head", head, n_head)):
        if value is None:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < count:
            raise ValueError(f"{name} {value!r} is out of range: the model has {count} {name}s, numbered 0..{count - 1}")


def attention_maps(params: Any, config: GPT2Config, ids: Any, dtype: Any = jnp.float32) -> AttentionMaps:
    """Every layer's attention probabilities for the token sequence ``ids``.

    Args:
        params: GPT-2 params.
        config: their architecture.
        ids: token ids ``[seq]`` (or ``[1, seq]``), at most ``n_positions``.
        dtype: the computation dtype (the softmax is always float32).

    Returns:
        an :class:`AttentionMaps` with ``attentions [n_layer, n_head, seq, seq]`` as float32 numpy; inside
        ``jax.jit`` (traced ``ids`` or ``params``) as a jax array, in a pytree the jitted function can return. The
        page and the PNG (:func:`write_attention_html`, :func:`plot_attention`) take the concrete result.
    """
    ids = ids_array(ids, config)
    out = forward(params, config, ids, attentions=True, logits_to_keep=1, dtype=dtype)
    stacked = jnp.stack(out.attentions)[:, 0].astype(jnp.float32)  # [n_layer, n_head, seq, seq]
    return AttentionMaps(ids, to_host(stacked))


# HTML ----------------------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px 0; }
#subtitle { color: #666; font-size: 12px; margin-bottom: 10px; }
#controls { margin: 8px 0 12px 0; display: flex; gap: 16px; align-items: center; }
#controls select { font-size: 14px; }
#status { font-size: 13px; color: #444; }
#status.error { color: #b00; font-weight: bold; }
#main { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
#heatmap { border-collapse: collapse; font-size: 11px; }
#heatmap td, #heatmap th { padding: 0; }
#heatmap th { font-weight: normal; white-space: pre; font-family: ui-monospace, Menlo, Consolas, monospace; }
#heatmap th.key { height: 70px; vertical-align: bottom; }
#heatmap th.key div { writing-mode: vertical-rl; transform: rotate(180deg); padding: 2px 0; }
#heatmap th.query { text-align: right; padding-right: 6px; }
#heatmap td.cell { width: 26px; height: 22px; min-width: 26px; text-align: center; border: 1px solid #eee;
  font-size: 9px; }
#heatmap td.masked { background: repeating-linear-gradient(45deg, #fafafa, #fafafa 3px, #f0f0f0 3px, #f0f0f0 6px); }
#grid { display: grid; gap: 3px; font-size: 10px; align-items: center; }
#grid .label { color: #666; text-align: right; padding-right: 3px; }
#grid .hlabel { color: #666; text-align: center; }
#grid canvas { width: 40px; height: 40px; image-rendering: pixelated; border: 2px solid transparent; cursor: pointer; }
#grid canvas.selected { border-color: #d62728; }
#grid canvas:hover { border-color: #999; }
h2 { font-size: 14px; margin: 0 0 6px 0; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
const SEQ = DATA.seq, NL = DATA.n_layer, NH = DATA.n_head;
const VALUES = (function () {  // [n_layer, n_head, seq, seq] float32, little-endian, base64
  const raw = atob(DATA.attentions);
  const view = new DataView(new ArrayBuffer(raw.length));
  for (let i = 0; i < raw.length; i++) view.setUint8(i, raw.charCodeAt(i));
  const out = new Float32Array(raw.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
})();
function value(layer, head, q, k) { return VALUES[((layer * NH + head) * SEQ + q) * SEQ + k]; }
function colour(v) { return "rgba(8, 81, 156, " + Math.max(0, Math.min(1, v)).toFixed(4) + ")"; }
function shown(token) {
  return token.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r").replace(/ /g, "\u2423");
}
const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");
const statusLine = document.getElementById("status");
for (let l = 0; l < NL; l++) layerSelect.add(new Option("layer " + l, String(l)));
for (let h = 0; h < NH; h++) headSelect.add(new Option("head " + h, String(h)));

function buildTable() {
  const table = document.getElementById("heatmap");
  const head = table.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.textContent = "query \\ key";
  head.appendChild(corner);
  for (let k = 0; k < SEQ; k++) {
    const th = document.createElement("th");
    th.className = "key";
    const div = document.createElement("div");
    div.textContent = shown(DATA.tokens[k]);
    th.appendChild(div);
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (let q = 0; q < SEQ; q++) {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.className = "query";
    th.textContent = shown(DATA.tokens[q]);
    row.appendChild(th);
    for (let k = 0; k < SEQ; k++) {
      const td = row.insertCell();
      td.className = k > q ? "cell masked" : "cell";
      td.id = "cell-" + q + "-" + k;
      td.dataset.q = String(q);
      td.dataset.k = String(k);
    }
  }
}

function buildGrid() {
  const grid = document.getElementById("grid");
  grid.style.gridTemplateColumns = "auto repeat(" + NH + ", auto)";
  grid.appendChild(document.createElement("div"));
  for (let h = 0; h < NH; h++) {
    const d = document.createElement("div");
    d.className = "hlabel";
    d.textContent = "h" + h;
    grid.appendChild(d);
  }
  for (let l = 0; l < NL; l++) {
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = "L" + l;
    grid.appendChild(label);
    for (let h = 0; h < NH; h++) {
      const canvas = document.createElement("canvas");
      canvas.width = SEQ;
      canvas.height = SEQ;
      canvas.id = "thumb-" + l + "-" + h;
      canvas.title = "layer " + l + ", head " + h;
      const ctx = canvas.getContext("2d");
      const image = ctx.createImageData(SEQ, SEQ);
      for (let q = 0; q < SEQ; q++) {
        for (let k = 0; k < SEQ; k++) {
          const v = Math.max(0, Math.min(1, value(l, h, q, k))), i = 4 * (q * SEQ + k);
          image.data[i] = Math.round(255 - v * (255 - 8));
          image.data[i + 1] = Math.round(255 - v * (255 - 81));
          image.data[i + 2] = Math.round(255 - v * (255 - 156));
          image.data[i + 3] = 255;
        }
      }
      ctx.putImageData(image, 0, 0);
      canvas.addEventListener("click", function () { select(l, h); });
      grid.appendChild(canvas);
    }
  }
}

function render(layer, head) {
  const labels = SEQ <= DATA.max_labelled;
  for (let q = 0; q < SEQ; q++) {
    for (let k = 0; k < SEQ; k++) {
      const td = document.getElementById("cell-" + q + "-" + k), v = value(layer, head, q, k);
      td.dataset.value = String(v);
      td.title = shown(DATA.tokens[q]) + " \u2192 " + shown(DATA.tokens[k]) + ": " + v.toFixed(4);
      if (k <= q) {
        td.style.background = colour(v);
        td.style.color = v > 0.5 ? "white" : "#333";
        td.textContent = labels ? v.toFixed(2).replace(/^0/, "") : "";
      }
    }
  }
  document.querySelectorAll("#grid canvas.selected").forEach(function (c) { c.classList.remove("selected"); });
  document.getElementById("thumb-" + layer + "-" + head).classList.add("selected");
  document.body.dataset.layer = String(layer);
  document.body.dataset.head = String(head);
  document.getElementById("detail-title").textContent = "layer " + layer + ", head " + head;
}

function select(layer, head) {
  layerSelect.value = String(layer);
  headSelect.value = String(head);
  statusLine.className = "";
  statusLine.textContent = "layer " + layer + " of 0.." + (NL - 1) + ", head " + head + " of 0.." + (NH - 1);
  render(layer, head);
  const hash = "#layer=" + layer + "&head=" + head;
  if (location.hash !== hash) history.replaceState(null, "", hash);
}

function fromHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  let layer = Number(layerSelect.value || DATA.layer), head = Number(headSelect.value || DATA.head);
  const problems = [];
  for (const [name, count] of [["layer", NL], ["head", NH]]) {
    if (!params.has(name)) continue;
    const text = params.get(name), v = Number(text);
    if (!/^\d+$/.test(text) || v >= count) {
      problems.push(name + " " + JSON.stringify(text) + " is out of range 0.." + (count - 1));
    } else if (name === "layer") { layer = v; } else { head = v; }
  }
  select(layer, head);
  if (problems.length) {
    statusLine.className = "error";
    statusLine.textContent = problems.join("; ") + " (showing layer " + layer + ", head " + head + ")";
  }
}

layerSelect.addEventListener("change", function () { select(Number(layerSelect.value), Number(headSelect.value)); });
headSelect.addEventListener("change", function () { select(Number(layerSelect.value), Number(headSelect.value)); });
window.addEventListener("hashchange", fromHash);
buildTable();
buildGrid();
layerSelect.value = String(DATA.layer);
headSelect.value = String(DATA.head);
fromHash();
document.body.dataset.ready = "1";
"""


def attention_html(maps: AttentionMaps, tokenizer: Any, title: str = "GPT-2 attention", layer: int = 0,
                   head: int = 0, max_labelled: int = 24) -> str:
    """The self-contained HTML page for ``maps`` (see the module docstring).

    Args:
        maps: the attention maps.
        tokenizer: labels the tokens.
        title: the page heading.
        layer, head: the map shown first (0-based; the URL hash ``#layer=L&head=H`` overrides it).
        max_labelled: cells show their value as text when the sequence has at most this many tokens (always in
            the tooltip and the cell's ``data-value``).

    Returns:
        The page's HTML text. The maps are embedded as base64 little-endian float32 inside a JSON block.
    """
    check_layer_head(layer, head, maps.n_layer, maps.n_head)
    n_layer, n_head, seq, _ = maps.attentions.shape
    data = {
        "tokens": token_labels(tokenizer, maps.input_ids),
        "ids": [int(i) for i in maps.input_ids],
        "n_layer": n_layer,
        "n_head": n_head,
        "seq": seq,
        "layer": int(layer),
        "head": int(head),
        "max_labelled": int(max_labelled),
        "attentions": base64.b64encode(np.ascontiguousarray(maps.attentions, dtype="<f4").tobytes()).decode("ascii"),
    }
    # "<" escaped so no token text can close the script element.
    payload = json.dumps(data, ensure_ascii=True).replace("<", "\\u003c")
    subtitle = f"{n_layer} layers x {n_head} heads, {seq} tokens. Click a thumbnail, use the pickers or the URL hash #layer=L&amp;head=H."
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div id="subtitle">{subtitle}</div>
<div id="controls">
<label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label>
<span id="status"></span>
</div>
<div id="main">
<div id="detail"><h2 id="detail-title"></h2><table id="heatmap"></table></div>
<div><h2>All layers and heads</h2><div id="grid"></div></div>
</div>
<script id="attention-data" type="application/json">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_attention_html(path: str | os.PathLike, maps: AttentionMaps, tokenizer: Any, title: str = "GPT-2 attention",
                         layer: int = 0, head: int = 0) -> None:
    """Write :func:`attention_html` to ``path`` atomically (a clear OSError when it cannot be written)."""
    path = check_output_path(path, "attention page")
    text = attention_html(maps, tokenizer, title, layer, head)
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def plot_attention(maps: AttentionMaps, tokenizer: Any, path: str | os.PathLike, layer: int, head: int,
                   title: str | None = None, dpi: int = 120) -> None:
    """Write a PNG heatmap of one layer and head (0-based): queries down, keys across, tokens as labels.

    The file is written atomically. Needs matplotlib (no pyplot: the global backend is left alone).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weights = maps.head(layer, head)  # [seq, seq]
    path = check_output_path(path, "heatmap")
    seq = weights.shape[0]
    labels = [t.replace("\n", "\\n").replace(" ", "\u2423") for t in token_labels(tokenizer, maps.input_ids)]
    side = max(4.0, 1.5 + 0.32 * seq)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="attention probability")
    ax.set_xticks(range(seq), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(seq), labels, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or f"layer {layer}, head {head}", fontsize=10)
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


# CLI -----------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """``gpt2-jax attention TEXT [--out PATH] [--png --layer L --head H]``."""
    from ._cli import add_model_arguments

    parser = subparsers.add_parser(
        "attention", help="attention maps as an interactive HTML page (or one PNG)",
        description="Write every layer's and head's attention over TEXT as one self-contained HTML page (no "
                    "network needed to view it), or with --png one layer/head as a PNG heatmap.",
    )
    parser.add_argument("text", help="the input text")
    parser.add_argument("--out", help="output file (default attention.html, or attention.png with --png)")
    parser.add_argument("--png", action="store_true", help="write one layer/head as a PNG instead of the page")
    parser.add_argument("--layer", type=int, default=None, help="layer, 0-based (--png: default 0; page: shown first)")
    parser.add_argument("--head", type=int, default=None, help="head, 0-based (--png: default 0; page: shown first)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run ``gpt2-jax attention``."""
    from ._cli import architecture, load_model
    from ._common import encode

    out = args.out or ("attention.png" if args.png else "attention.html")
    check_output_path(out, "PNG heatmap" if args.png else "attention page")
    layer = 0 if args.layer is None else args.layer
    head = 0 if args.head is None else args.head
    if args.random_weights:  # fail on a bad layer/head before building the weights
        config = architecture(args.model)
        check_layer_head(layer, head, config.n_layer, config.n_head)
    model = load_model(args)
    check_layer_head(layer, head, model.config.n_layer, model.config.n_head)
    ids = encode(model.tokenizer, args.text, model.config)
    maps = attention_maps(model.params, model.config, ids, model.compute_dtype)
    if args.png:
        plot_attention(maps, model.tokenizer, out, layer, head, title=f"{model.source}: layer {layer}, head {head}")
    else:
        write_attention_html(out, maps, model.tokenizer, title=f"Attention of {model.source}", layer=layer, head=head)
    print(f"wrote {out}")
    return 0
