"""Research and benchmarking tools: look inside a GPT-2 and measure it on any JAX backend.

Each tool is a documented function returning arrays or dataclasses (for notebooks) plus a ``gpt2-jax`` command:

* :func:`next_token_table` (``gpt2-jax next``): the next-token probability table;
* :func:`logit_lens` (``gpt2-jax lens``): every layer read through ``ln_f`` and the tied LM head, as a table and a
  PNG heatmap (:func:`plot_logit_lens`);
* :func:`attention_maps` (``gpt2-jax attention``): every layer's and head's attention, as a self-contained HTML
  page (:func:`write_attention_html`) or one PNG (:func:`plot_attention`);
* :func:`model_info` (``gpt2-jax info``): parameter counts per module and in total, dtypes, bytes, config;
* :func:`run_benchmark` (``gpt2-jax bench``): compile time, time to first token, prefill and decode throughput,
  peak memory, decode memory-bandwidth and prefill FLOPs utilisation, as a table and as schema-checked JSON.

Matplotlib is imported only by the PNG functions.
"""

from .attention_view import AttentionMaps, attention_html, attention_maps, plot_attention, write_attention_html
from .bench import BenchReport, format_bench_report, load_schema, run_benchmark
from .devices import DevicePeaks, lookup_device
from .info import ModelInfo, ModuleParams, format_model_info, model_info
from .jsonschema_lite import validate as validate_json
from .lens import LogitLens, format_logit_lens, logit_lens, plot_logit_lens
from .next_token import NextTokenRow, format_next_token_table, next_token_probs, next_token_table, next_token_top

__all__ = [
    "AttentionMaps", "attention_html", "attention_maps", "plot_attention", "write_attention_html",
    "BenchReport", "format_bench_report", "load_schema", "run_benchmark",
    "DevicePeaks", "lookup_device",
    "ModelInfo", "ModuleParams", "format_model_info", "model_info",
    "validate_json",
    "LogitLens", "format_logit_lens", "logit_lens", "plot_logit_lens",
    "NextTokenRow", "format_next_token_table", "next_token_probs", "next_token_table", "next_token_top",
]
