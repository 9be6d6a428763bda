"""``gpt2-jax generate``: generate text from the command line.

Example::

    gpt2-jax generate "The theory of relativity is" --max-new-tokens 40 --seed 1
    gpt2-jax generate "Hello" --model ./my-gpt2 --greedy --stream
    gpt2-jax generate "Once upon a time" --num-beams 4 --num-return-sequences 2 --no-repeat-ngram-size 3
    gpt2-jax generate "Hello" --dtype bfloat16 --quantize int8

``--dtype bfloat16`` stores the weights in bfloat16; on the CPU they are computed in float32 (XLA CPU's bfloat16
matrix-vector products are ~8x slower), on GPU/TPU in bfloat16. ``--quantize int8`` quantizes the weights (int8,
per-channel scales); on the CPU generation dequantizes them once to float32. A one-line note on stderr says which.

JAX's persistent compilation cache is enabled (``~/.cache/gpt2-jax/jax``, or ``$GPT2_JAX_COMPILATION_CACHE``;
set it to ``off`` to disable), so the second run of the same shapes skips compilation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CACHE_ENV = "GPT2_JAX_COMPILATION_CACHE"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gpt2-jax/jax`` (``~/.cache/gpt2-jax/jax``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2-jax" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache (every program, however fast it compiled).

    Args:
        directory: where to keep it; default ``$GPT2_JAX_COMPILATION_CACHE`` or :func:`default_cache_dir`.
            ``off`` (or ``0``, ``none``, empty) disables it.

    Returns:
        The directory used, or None when disabled.
    """
    import jax

    value = os.fspath(directory) if directory is not None else os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    path = Path(value).expanduser() if value else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def register(subparsers) -> None:
    """Add the ``generate`` subcommand."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text with a GPT-2 checkpoint. Samples (temperature / top-k / top-p) by default; "
        "--greedy for greedy decoding, --num-beams N for beam search.",
    )
    p.add_argument("prompt", help='the prompt ("" starts from <|endoftext|>)')
    p.add_argument("--model", default="gpt2", help="hub id or local checkpoint directory (default: gpt2); with "
                   "--random-weights, the architecture (a preset such as gpt2, or a config.json)")
    from ..checkpoints.random_weights import add_adapter_argument, add_random_weights_argument

    add_random_weights_argument(p)
    add_adapter_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default: 50)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no <|endoftext|> before this many tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature > 0 (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens, 0 = off (default: 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty > 0, 1.0 = off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: 1)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default: 1.0)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="sequences to return (default: 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
    mode.add_argument("--do-sample", action="store_true", help="sample (the default without beams; with "
                      "--num-beams, beam sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="params dtype (default: float32); computed in it on GPU/TPU, in float32 on the CPU (XLA "
                        "CPU's bfloat16 matrix-vector products are ~8x slower)")
    p.add_argument("--quantize", default=None, choices=("int8",),
                   help="int8 weight-only quantization, per-channel scales (on the CPU dequantized once to float32)")
    p.add_argument("--timings", action="store_true", help="print load / generation times to stderr")
    p.add_argument("--min-p", type=float, default=None, help="min-p sampling: drop tokens below this fraction of "
                   "the top token's probability, in [0, 1]")
    p.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling mass in (0, 1] (1.0 = off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop a sequence once its text contains TEXT (repeatable)")
    p.add_argument("--assistant-model", default=None, metavar="PATH",
                   help="speculative decoding with this smaller GPT-2 (same tokenizer) as the draft")
    p.add_argument("--num-assistant-tokens", type=int, default=5, metavar="K",
                   help="draft tokens per speculative step (default: 5)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="prompt-lookup decoding: N draft tokens copied from n-gram matches in the text")
    p.add_argument("--scores", default=None, metavar="FILE.npy",
                   help="save the processed scores of every step, [sequences, steps, vocab] float32, as .npy")
    p.set_defaults(func=run)


def _generation_config(args):
    from .config import GenerationConfig

    do_sample = args.do_sample or (args.num_beams == 1 and not args.greedy)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        num_return_sequences=args.num_return_sequences, min_p=getattr(args, "min_p", None),
        typical_p=getattr(args, "typical_p", 1.0), stop_strings=getattr(args, "stop", None) or None,
        num_assistant_tokens=getattr(args, "num_assistant_tokens", 5),
        prompt_lookup_num_tokens=getattr(args, "prompt_lookup", None),
        output_scores=getattr(args, "scores", None) is not None,
    )


def _owned_for_generation(model, rows: int):
    """``model`` with its params replaced by the weights generation computes with when each decode step computes
    ``rows`` rows, each original array freed as its prepared copy is made
    (:func:`~gpt2_jax.generation.weight_layout.decode_weights` with ``consume``): the CLI owns what it loaded, so
    the CPU's transposed kernels (one row) cost one kernel of extra memory, not a second copy of every kernel
    (gpt2-xl: 5.8 GB)."""
    import dataclasses

    from .weight_layout import decode_weights

    return dataclasses.replace(model, params=decode_weights(model.params, consume=True, rows=rows))


def _print_precision_note(dtype: str, quantize: str | None, params) -> None:
    """One line on stderr saying how a narrow dtype or a quantization runs here (nothing for plain float32)."""
    from .. import backend
    from ..precision import precision_note

    note = precision_note(dtype, backend.tuning_for(params), quantize, backend.platform_of(params))
    if note:
        print(f"note: {note}", file=sys.stderr)


def _check_precision_args(args: argparse.Namespace) -> None:
    """Bad --dtype / --quantize values fail before anything loads (argparse checks the CLI; this, direct calls)."""
    from ..precision import QUANTIZATIONS

    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be one of float32, bfloat16, float16, got {args.dtype!r}")
    quantize = getattr(args, "quantize", None)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")


def _generate_with_scores(args: argparse.Namespace, model, config, key, assistant=None) -> None:
    """Generate (speculatively with a loaded ``assistant``), print the texts and save the processed scores of every
    step to ``args.scores`` (.npy)."""
    import numpy as np

    from .api import generate

    tok = model.tokenizer
    drafting = {} if assistant is None else dict(assistant_params=assistant.params, assistant_config=assistant.config)
    out = generate(model.params, [tok.encode(args.prompt)], key=key if config.do_sample else None, config=config,
                   model_config=model.config, tokenizer=tok, **drafting)
    rows = out.new_tokens()
    for i, row in enumerate(rows):
        if len(rows) > 1:
            print(f"=== {i + 1} ===")
        print(args.prompt + tok.decode(row, skip_special_tokens=True))
    np.save(args.scores, out.scores)
    print(f"scores: {list(out.scores.shape)} float32 -> {args.scores}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run ``gpt2-jax generate``; returns the exit code."""
    config = _generation_config(args)  # bad knobs fail here, before loading anything
    _check_precision_args(args)
    if args.stream and (config.num_beams > 1 or config.num_return_sequences > 1):
        raise ValueError("--stream works with one sequence and no beam search")
    assistant_path = getattr(args, "assistant_model", None)
    drafting = assistant_path is not None or config.prompt_lookup_num_tokens is not None
    if drafting and (args.stream or config.num_beams > 1):
        raise ValueError("--assistant-model / --prompt-lookup do not combine with --stream or --num-beams > 1")
    if assistant_path is not None and config.prompt_lookup_num_tokens is not None:
        raise ValueError("--assistant-model and --prompt-lookup are two kinds of drafting: pick one")
    if args.stream and (config.output_scores or config.stop_strings):
        raise ValueError("--scores and --stop do not combine with --stream")
    enable_compilation_cache()

    import jax

    from ..checkpoints.random_weights import is_random, load_or_random
    from .text import generate_text, stream_text

    t0 = time.perf_counter()
    adapter = getattr(args, "adapter", None)
    model = load_or_random(args.model, getattr(args, "random_weights", False), seed=args.seed, dtype=args.dtype,
                           adapter=adapter)
    if is_random(model):
        print(f"note: {model.notes[0]}", file=sys.stderr)
    if adapter is not None:
        print(f"note: {model.notes[-1]}", file=sys.stderr)
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        import dataclasses

        from ..precision import quantize_params

        model = dataclasses.replace(model, params=quantize_params(model.params, quantize))
    _print_precision_note(args.dtype, quantize, model.params)
    rows = config.rows_per_prompt  # per decode step: the command generates for one prompt
    model = _owned_for_generation(model, rows)
    assistant = None
    if assistant_path is not None:
        assistant = _owned_for_generation(load_or_random(assistant_path, getattr(args, "random_weights", False),
                                                         seed=args.seed + 1, dtype=args.dtype), rows)
    t1 = time.perf_counter()
    key = jax.random.key(args.seed)
    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        first = None
        for piece in stream_text(args.prompt, model, config, key=key):
            first = first if first is not None else time.perf_counter()
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    elif config.output_scores:
        _generate_with_scores(args, model, config, key, assistant)
    else:
        texts = generate_text(args.prompt, model, config, key=key, return_full_text=True, assistant=assistant)
        texts = [texts] if isinstance(texts, str) else texts
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"=== {i + 1} ===")
            print(text)
        first = None
    t2 = time.perf_counter()
    if args.timings:
        extra = f", first piece after {first - t1:.2f} s" if first is not None else ""
        print(f"[load {t1 - t0:.2f} s ({model.source}), generate {t2 - t1:.2f} s{extra}]", file=sys.stderr)
    return 0
