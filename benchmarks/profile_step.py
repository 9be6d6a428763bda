"""Where one compiled step's time goes on XLA's CPU backend: a per-instruction profile of the train or decode step.

XLA CPU runs a compiled program as a graph of *thunks*, one per instruction of the optimised HLO (a fusion, a
library dot, a copy), several at once when the graph allows. This script traces one call with ``jax.profiler``,
maps every thunk event back to its HLO instruction (shape, dtype, whether it computes a dot) and reports:

- the **wall-time partition** of the call: time when only dots run, dots and other work together, only other work
  (elementwise fusions, copies, reductions: the time no matrix unit is busy), and idle gaps;
- the **largest groups** of instructions by kind and output shape: how many, their summed thunk time (concurrent
  thunks overlap, so it can exceed the wall time) and the share of the *other-only* wall time they account for (split
  evenly between the thunks running at once). A step bound by its dots has little other-only time; what has the most
  of it is what to fuse, remove or make parallel.

Tracing costs time, unevenly: a gpt2 bfloat16 train step took 3.12 s traced vs 3.01 s untraced, and a parallel
loop fusion reads longer in the trace than it costs (the 100 MB transposed copy of the logits' gradient: 50-58 ms
traced, ~20 ms untraced, measured as the difference of a program with and without it). Read the figures as where to
look, then measure a change untraced (``bench_train.py``).

It reads the trace through ``jax._src.profiler.ProfileData`` (JAX's own trace reader; private, so this is a
benchmark script, not library code) and relies on XLA CPU naming thunk events after their instructions; on a GPU
or TPU the events are device kernels: use XProf / TensorBoard there.

    python benchmarks/profile_step.py train [--model gpt2] [--batch 4] [--seq 256] [--dtype bfloat16] [--top 25]
    python benchmarks/profile_step.py decode [--batch 32] [--prompt 128]

``--layers / --embd / --heads / --vocab`` shrink the preset for a quick look. A bfloat16 train step on the CPU
needs ``GPT2_JAX_TUNING=low_precision_compute=1`` (as ``bench_train.py --dtype bfloat16``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (.*)")
_COMPUTATION = re.compile(r"%([\w.\-]+) .*\{$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What the profile needs of one HLO instruction: its output shape and what it computes."""

    shape: str  # e.g. "bf16[1024,3072]{1,0}"
    kind: str  # the instruction's name without its numeric suffix: "copy_bitcast_fusion", "ynn_fusion", ...
    is_dot: bool  # a dot, or a fusion around one
    operand_dtypes: str  # of a dot's two operands, e.g. "bf16,bf16"; "" for other instructions


def _operand_dtypes(call: str, shapes: dict[str, str]) -> str:
    """``"bf16,bf16"``: the element types of what an HLO call ``op(%a, %b), ...`` reads, from ``shapes`` (instruction
    name -> output shape; names are unique in a module)."""
    operands = re.findall(r"%([\w.\-]+)", call.split("(", 1)[1].split(")")[0])
    return ",".join(shapes.get(o, "?").split("[")[0] for o in operands)


def instruction_table(hlo_text: str) -> dict[str, Instruction]:
    """Instruction name -> :class:`Instruction`, for every instruction of an optimised HLO module's text."""
    bodies: dict[str, list[str]] = {}  # fused computation -> its instructions' right-hand sides
    current = None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            bodies[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None and (instruction := _INSTRUCTION.match(line)):
            bodies[current].append(instruction.group(3))  # what it computes: "dot(%p0, %p1), ...", ...
    parsed = [m.groups() for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m]  # (name, shape, rest)
    shapes = {name: shape for name, shape, _ in parsed}
    table = {}
    for name, shape, rest in parsed:
        if name in table:
            continue
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(called.group(1), []) if called else []
        dot_call = rest if rest.startswith("dot(") else next((b for b in body if b.startswith("dot(")), None)
        table[name] = Instruction(shape=shape, kind=re.sub(r"[.\d]+$", "", name), is_dot=dot_call is not None,
                                  operand_dtypes=_operand_dtypes(dot_call, shapes) if dot_call else "")
    return table


def trace_events(run: Callable[[], object], table: dict[str, Instruction]) -> tuple[list[tuple[int, int, str]], float]:
    """``(events, seconds)``: ``(start_ns, end_ns, instruction name)`` of every thunk event of one traced ``run()``
    that names an instruction of ``table``, and the wall seconds of that call."""
    from jax._src.profiler import ProfileData  # JAX's trace reader (private API; see the module docstring)

    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        try:
            start = time.perf_counter()
            jax.block_until_ready(run())
            seconds = time.perf_counter() - start
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {logdir}")
        data = ProfileData.from_file(files[0])
    events = [(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name)
              for plane in data.planes for line in plane.lines for ev in line.events if ev.name in table]
    return events, seconds


@dataclasses.dataclass
class Group:
    """Instructions of one kind and output shape: count, summed thunk seconds, other-only wall seconds."""

    count: int = 0
    thunk_s: float = 0.0
    other_only_s: float = 0.0


def summarize(events: list[tuple[int, int, str]], table: dict[str, Instruction]):
    """``(partition, groups)``: seconds of the traced span by what ran (``dots only``, ``dots + other``,
    ``other only``, ``idle``) and :class:`Group` per ``(kind, shape)`` (dots are keyed by their operand dtypes)."""
    groups: dict[tuple[str, str], Group] = collections.defaultdict(Group)
    keys = []
    for start, end, name in events:
        ins = table[name]
        shape = "(tuple)" if ins.shape.startswith("(") else ins.shape.split("{")[0]
        key = (f"dot({ins.operand_dtypes})" if ins.is_dot else ins.kind, shape)
        keys.append(key)
        groups[key].count += 1
        groups[key].thunk_s += (end - start) / 1e9
    partition = collections.Counter({"dots only": 0.0, "dots + other": 0.0, "other only": 0.0, "idle": 0.0})
    if not events:
        return partition, groups
    # Sweep the event boundaries; between two of them the set of running thunks is fixed.
    starts = [(start, 1, i) for i, (start, _, _) in enumerate(events)]
    ends = [(end, -1, i) for i, (_, end, _) in enumerate(events)]
    boundaries = sorted(starts + ends)  # at equal times an end sorts before a start
    running: set[int] = set()
    last = boundaries[0][0]
    for time_ns, delta, index in boundaries:
        span = (time_ns - last) / 1e9
        dots = [i for i in running if table[events[i][2]].is_dot]
        others = [i for i in running if not table[events[i][2]].is_dot]
        if dots:
            partition["dots + other" if others else "dots only"] += span
        elif others:
            partition["other only"] += span
            for i in others:
                groups[keys[i]].other_only_s += span / len(others)
        else:
            partition["idle"] += span
        last = time_ns
        (running.add if delta == 1 else running.discard)(index)
    return partition, groups


def report(title: str, wall_s: float, partition, groups, top: int) -> str:
    """The printed profile (see the module docstring): the partition, then the dot groups by thunk time and the
    other groups by the other-only wall time they account for."""
    span = sum(partition.values())
    lines = [f"{title}: traced call {wall_s * 1e3:.1f} ms; thunks span {span * 1e3:.1f} ms"]
    lines += [f"  {name:<13} {seconds * 1e3:9.1f} ms  {seconds / span if span else 0:6.1%}"
              for name, seconds in partition.items()]
    header = f"  {'(kind, output shape)':<48} {'count':>5} {'thunk ms':>9} {'other-only ms':>14}"
    for label, is_dot, order in (("dots", True, "thunk_s"), ("other work", False, "other_only_s")):
        lines += [f"{label}:", header]
        ranked = sorted(((key, g) for key, g in groups.items() if key[0].startswith("dot(") == is_dot),
                        key=lambda kv: getattr(kv[1], order), reverse=True)
        for (kind, shape), g in ranked[:top]:
            lines.append(f"  {kind + ' ' + shape:<48} {g.count:5d} {g.thunk_s * 1e3:9.1f} {g.other_only_s * 1e3:14.1f}")
    return "\n".join(lines)


def _config(args):
    from gpt2_jax.config import GPT2Config

    overrides = {k: v for k, v in (("n_layer", args.layers), ("n_embd", args.embd), ("n_head", args.heads),
                                   ("vocab_size", args.vocab)) if v is not None}
    return GPT2Config.from_preset(args.model, **overrides).replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def train_program(args):
    """``(compiled step, run(), title)``: the train step (AdamW, clipping; no dropout) on random tokens."""
    from gpt2_jax.model import init_params
    from gpt2_jax.training.optim import OptimizerConfig, make_optimizer
    from gpt2_jax.training.step import TrainState, make_train_step

    config = _config(args)
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1000))
    holder = {"state": TrainState.create(init_params(jax.random.PRNGKey(0), config), optimizer)}
    step = make_train_step(config, optimizer, schedule, dropout=False, compute_dtype=jnp.dtype(args.dtype))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq + 1), np.int32))
    compiled = step.lower(holder["state"], tokens, jax.random.PRNGKey(0)).compile()

    def run():
        holder["state"], metrics = compiled(holder["state"], tokens, jax.random.PRNGKey(0))
        return metrics

    return compiled, run, f"train step {args.model} {args.batch} x {args.seq} {args.dtype}"


def decode_program(args):
    """``(compiled step, run(), title)``: one decode step of the generation engine over a prefilled cache."""
    from gpt2_jax import backend
    from gpt2_jax.generation import engine
    from gpt2_jax.model import init_params

    config = _config(args)
    params = init_params(jax.random.PRNGKey(0), config)
    tuning = backend.tuning_for(params)
    weights = engine.program_weights(params, tuning, rows=args.batch)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.prompt)), jnp.int32)
    cache = engine.init_cache(config, args.batch, args.prompt + engine.new_token_cap(16))
    logits, cache = engine._prefill(weights, ids, jnp.ones_like(ids), cache, config=config, dtype="float32",
                                    tuning=tuning)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    compiled = engine._decode_step.lower(weights, token, cache, config=config, dtype="float32",
                                         tuning=tuning).compile()
    holder = {"cache": cache}  # the step donates its cache: each call takes the previous call's

    def run():
        logits, holder["cache"] = compiled(weights, token, holder["cache"])
        return logits

    return compiled, run, f"decode step {args.model} batch {args.batch}, {args.prompt} cache slots filled"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", choices=("train", "decode"))
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset (architecture only; random weights)")
    parser.add_argument("--layers", type=int, help="override the preset's n_layer")
    parser.add_argument("--embd", type=int, help="override the preset's n_embd")
    parser.add_argument("--heads", type=int, help="override the preset's n_head")
    parser.add_argument("--vocab", type=int, help="override the preset's vocab_size")
    parser.add_argument("--batch", type=int, help="rows (default: 4 for train, 32 for decode)")
    parser.add_argument("--seq", type=int, default=256, help="train: tokens per row")
    parser.add_argument("--prompt", type=int, default=128, help="decode: prompt length (filled cache slots)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="train: compute dtype")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before the traced one")
    parser.add_argument("--top", type=int, default=25, help="groups to print")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.program == "train" else 32
    compiled, run, title = (train_program if args.program == "train" else decode_program)(args)
    table = instruction_table(compiled.as_text())
    times = []
    for _ in range(max(args.warmup, 1)):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    listed = ", ".join(f"{t * 1e3:.1f}" for t in times)
    print(f"untraced calls: {listed} ms (median {statistics.median(times) * 1e3:.1f})")
    events, wall = trace_events(run, table)
    partition, groups = summarize(events, table)
    print(report(title, wall, partition, groups, args.top))


if __name__ == "__main__":
    main(sys.argv[1:])
