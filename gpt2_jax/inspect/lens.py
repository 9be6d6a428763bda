"""The logit lens: read every layer's hidden state through the final layer norm and the tied LM head.

For each layer and position it gives the tokens the model would predict next if the network stopped there
(nostalgebraist, "interpreting GPT: the logit lens", 2020). Row ``0`` reads the embeddings, row ``i`` the output
of block ``i``; the last row is the model's own output, so its values are the model's logits.

    >>> lens = logit_lens(params, config, tokenizer.encode("The theory of relativity is"))
    >>> print(format_logit_lens(lens, tokenizer))
    >>> plot_logit_lens(lens, tokenizer, "lens.png")
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..atomic import atomic_write_path
from ..config import GPT2Config
from ..model import GPT2LMHeadModel
from ._common import DTYPES, check_output_path, dtype_name, ids_array, resolve_dtype, to_host, token_labels


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """The logit lens of one sequence (``L = n_layer``).

    Attributes:
        input_ids: ``[seq]`` the input tokens.
        top_ids: ``[L + 1, seq, top]`` the most likely next tokens read from each layer, most likely first.
        top_probs: ``[L + 1, seq, top]`` their probabilities.
        target_probs: ``[L + 1, seq - 1]`` the probability each layer gives the token that actually comes next in
            the input.
        logits: ``[L + 1, seq, vocab]`` float32 lens logits, when asked for (``return_logits=True``), else None.
        layer_names: ``L + 1`` row names: ``embeddings``, ``layer 1`` ... ``layer L`` (the output of block i).
    """

    input_ids: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    target_probs: np.ndarray
    logits: np.ndarray | None
    layer_names: tuple[str, ...]


# A pytree (layer_names static), so that jax.jit can return it: inside jit its fields are jax arrays.
jax.tree_util.register_dataclass(LogitLens, data_fields=["input_ids", "top_ids", "top_probs", "target_probs", "logits"],
                                 meta_fields=["layer_names"])


def layer_names(config: GPT2Config) -> tuple[str, ...]:
    """``("embeddings", "layer 1", ..., "layer n_layer")``: what each hidden state is the output of."""
    return ("embeddings", *(f"layer {i}" for i in range(1, config.n_layer + 1)))


def _read_out(module: GPT2LMHeadModel, hidden: jax.Array, normed: jax.Array) -> jax.Array:
    """``hidden [seq, n_embd]`` -> lens logits ``[seq, vocab]``: ``ln_f`` (unless ``normed``) then the tied head."""
    hidden = jnp.where(normed, hidden, module.ln_f(hidden))
    return module.lm_logits(hidden).astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _lens_fn(config: GPT2Config, dtype_key: str, top: int, return_logits: bool):
    model = GPT2LMHeadModel(config, dtype=DTYPES[dtype_key])

    def lens(params, ids):  # ids [1, seq]
        out = model.apply({"params": params}, ids, output_hidden_states=True, logits_to_keep=1)
        states = jnp.stack(out.hidden_states)[:, 0]  # [L + 1, seq, n_embd]
        # The model returns the last hidden state after ln_f (as Hugging Face does): apply ln_f to the others only.
        normed = jnp.arange(config.n_layer + 1) == config.n_layer  # [L + 1]
        targets = ids[0, 1:]  # [seq - 1]

        def one_layer(args):
            hidden, is_normed = args
            logits = model.apply({"params": params}, hidden, is_normed, method=_read_out)  # [seq, vocab]
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            top_logprobs, top_ids = jax.lax.top_k(logprobs, top)  # [seq, top]
            target = jnp.take_along_axis(logprobs[:-1], targets[:, None], axis=-1)[:, 0]  # [seq - 1]
            kept = logits if return_logits else jnp.zeros((), jnp.float32)
            return top_ids, jnp.exp(top_logprobs), jnp.exp(target), kept

        return jax.lax.map(one_layer, (states, normed))  # stacked over the L + 1 layers

    return jax.jit(lens)


def logit_lens(params: Any, config: GPT2Config, ids: Any, top: int = 5, return_logits: bool = False,
               dtype: Any = jnp.float32) -> LogitLens:
    """The logit lens of the token sequence ``ids``.

    Every hidden state ``[seq, n_embd]`` (the embeddings and each block's output) goes through the final layer
    norm and the LM head tied to ``wte``; the last one is already normed by the model, so it goes through the head
    only and its lens logits are the model's own logits.

    Args:
        params: GPT-2 params.
        config: their architecture.
        ids: token ids ``[seq]`` (or ``[1, seq]``), at most ``n_positions``.
        top: how many of the most likely tokens to keep per layer and position.
        return_logits: also return the full lens logits ``[n_layer + 1, seq, vocab]`` (large for long inputs).
        dtype: the computation dtype (softmax in float32).

    Returns:
        a :class:`LogitLens` of numpy arrays; inside ``jax.jit`` (traced ``ids`` or ``params``) of jax arrays, and
        the LogitLens is a pytree the jitted function can return. The table and the PNG
        (:func:`format_logit_lens`, :func:`plot_logit_lens`) take the concrete result, outside ``jit``.
    """
    ids = ids_array(ids, config)
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or not 1 <= top <= config.vocab_size:
        raise ValueError(f"top must be an integer in [1, vocab_size={config.vocab_size}], got {top!r}")
    fn = _lens_fn(config, dtype_name(resolve_dtype(dtype)), int(top), bool(return_logits))
    top_ids, top_probs, target_probs, logits = fn(params, jnp.asarray(ids)[None, :])
    return LogitLens(
        input_ids=ids,
        top_ids=to_host(top_ids),
        top_probs=to_host(top_probs),
        target_probs=to_host(target_probs),
        logits=to_host(logits) if return_logits else None,
        layer_names=layer_names(config),
    )


def _cell(label: str, width: int) -> str:
    text = label.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "\u2423")
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def format_logit_lens(lens: LogitLens, tokenizer: Any, width: int = 8, probs: bool = False) -> str:
    """A plain-text table: one row per input position, one column per layer, each cell the layer's most likely
    next token (spaces shown as ``␣``), with its probability when ``probs``. A ``*`` marks a cell whose token is the
    one that actually comes next."""
    names = ["emb", *(str(i) for i in range(1, len(lens.layer_names)))]
    inputs = [_cell(t, 12) for t in token_labels(tokenizer, lens.input_ids)]
    in_width = max(len("input"), *map(len, inputs))
    cell_width = width + (6 if probs else 0) + 1
    lines = [f"{'pos':>4}  {'input':<{in_width}}  " + " ".join(f"{n:<{cell_width}}" for n in names).rstrip()]
    seq = len(lens.input_ids)
    for pos in range(seq):
        cells = []
        for layer in range(len(names)):
            token_id = int(lens.top_ids[layer, pos, 0])
            text = _cell(token_labels(tokenizer, [token_id])[0], width)
            if probs:
                text += f" {lens.top_probs[layer, pos, 0]:.3f}"
            hit = pos + 1 < seq and token_id == int(lens.input_ids[pos + 1])
            cells.append(f"{text + ('*' if hit else ''):<{cell_width}}")
        lines.append(f"{pos:>4}  {inputs[pos]:<{in_width}}  " + " ".join(cells).rstrip())
    return "\n".join(lines)


def plot_logit_lens(lens: LogitLens, tokenizer: Any, path: str | os.PathLike, title: str | None = None,
                    dpi: int = 120) -> None:
    """Write a PNG heatmap: layers (embeddings at the bottom) by input positions, coloured by the probability of
    each cell's most likely token, which is written in the cell (bold where it is the token that comes next).

    The file is written atomically. Needs matplotlib (no pyplot: the global backend is left alone).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_output_path(path, "heatmap")
    probs = lens.top_probs[:, :, 0]  # [L + 1, seq]
    n_rows, seq = probs.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * seq), max(3.0, 1.2 + 0.32 * n_rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(probs, origin="lower", aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="probability of the top token")
    for layer in range(n_rows):
        for pos in range(seq):
            token_id = int(lens.top_ids[layer, pos, 0])
            hit = pos + 1 < seq and token_id == int(lens.input_ids[pos + 1])
            ax.text(pos, layer, _cell(token_labels(tokenizer, [token_id])[0], 10), ha="center", va="center",
                    fontsize=7, color="white" if probs[layer, pos] > 0.55 else "black",
                    fontweight="bold" if hit else "normal")
    ax.set_xticks(range(seq), [_cell(t, 12) for t in token_labels(tokenizer, lens.input_ids)], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), list(lens.layer_names), fontsize=8)
    ax.set_xlabel("input token")
    ax.set_title(title or "logit lens: most likely next token per layer (bold: the actual next token)", fontsize=9)
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


# CLI -----------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """``gpt2-jax lens TEXT [--png PATH] [--top N] [--probs]``."""
    from ._cli import add_model_arguments

    parser = subparsers.add_parser(
        "lens", help="the logit lens: each layer's most likely next token",
        description="Read every layer's hidden state through the final layer norm and the LM head and print, "
                    "for each position, the most likely next token per layer (optionally a PNG heatmap).",
    )
    parser.add_argument("text", help="the input text")
    parser.add_argument("--png", metavar="PATH", help="also write a heatmap of the probabilities to PATH")
    parser.add_argument("--probs", action="store_true", help="show probabilities in the table")
    parser.add_argument("--width", type=int, default=8, help="characters per token in the table (default 8)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run ``gpt2-jax lens``."""
    from ._cli import load_model
    from ._common import encode

    if args.width < 2:
        raise ValueError(f"--width must be at least 2, got {args.width}")
    if args.png:
        check_output_path(args.png, "heatmap")
    model = load_model(args)
    ids = encode(model.tokenizer, args.text, model.config)
    lens = logit_lens(model.params, model.config, ids, top=1, dtype=model.compute_dtype)
    print(format_logit_lens(lens, model.tokenizer, args.width, args.probs))
    if args.png:
        plot_logit_lens(lens, model.tokenizer, args.png, title=f"logit lens of {model.source}")
        print(f"wrote {args.png}")
    return 0
