"""Peak resident memory while loading a gpt2-large-sized checkpoint, against the size of its file.

Writes a random-weight checkpoint of the chosen architecture (default ``gpt2-large``: 774M params, ~3.1 GB of
float32 safetensors) with ``save_hf_directory`` into a temporary directory, then loads it with ``from_pretrained``
in a fresh Python process and reads that process's peak RSS (``ru_maxrss``). The loader memory-maps the file,
copies each tensor into a jax array and releases the file pages it has copied from, so the peak should stay close
to one copy of the weights plus the interpreter and XLA runtime (aim: under 1.3x the file size).

Usage::

    python benchmarks/bench_load_memory.py                      # gpt2-large, float32, in $TMPDIR
    python benchmarks/bench_load_memory.py --preset gpt2 --dir /data/tmp --no-release   # compare without release

Needs free disk for the file (checked first) and about 2x its size in RAM while writing it. Not a test: it takes
a minute and several GB of memory.

Measured on the 2-core CPU development machine (glibc malloc, jax 0.10): gpt2-large, float32, 3.096 GB file ->
peak RSS 3.82-3.87 GB = 1.23-1.25x the file (0.21 GB of it is python + jax before loading). The rest above one
copy is glibc's heap keeping freed chunks (``MALLOC_MMAP_THRESHOLD_=1048576`` brings it to 1.17x). Without
releasing the mapped pages (``--no-release``) gpt2 (124M) peaks at 2.52x instead of 1.79x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Both children are started from this small launcher process (no numpy/jax imported here): Linux carries the
# parent's RSS at fork time into a child's ru_maxrss across exec, so a big parent would inflate the figure.
# VmHWM (the peak RSS of the child's own address space) is reported next to ru_maxrss as a cross-check.
CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")                      # the random checkpoint has no tokenizer files: say nothing
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()                     # XLA runtime up before the baseline
from gpt2_jax.checkpoints import formats
from gpt2_jax.checkpoints.pretrained import from_pretrained
if sys.argv[2] == "no-release":
    formats.release_pages = lambda array: False      # the loader calls it through the module
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
loaded = from_pretrained(sys.argv[1], dtype=sys.argv[3])
jax.block_until_ready(loaded.params)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded.params))
result = {"baseline": baseline, "peak": peak, "vmhwm": hwm(), "seconds": seconds, "params_bytes": nbytes}
if int(sys.argv[4]) > 0:                             # then generate: prepare the decode weights, greedy tokens
    from gpt2_jax.generation import GenerationConfig, generate
    from gpt2_jax.generation.weight_layout import decode_weights
    start = time.perf_counter()
    originals = jax.tree_util.tree_leaves(loaded.params)
    consume = sys.argv[5] == "consume"               # what the CLIs do: each copied original freed as it is copied
    prepared = decode_weights(loaded.params, consume=consume)
    jax.block_until_ready(prepared)
    new = [x for x in jax.tree_util.tree_leaves(prepared) if not any(x is y for y in originals)]
    freed = [y for y in originals if y.is_deleted()]
    result["prepared_extra_bytes"] = sum(x.nbytes for x in new) - sum(y.nbytes for y in freed)
    result["peak_prepared"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del originals, freed, new
    out = generate(prepared, jnp.asarray([[464, 3290, 318]], jnp.int32),
                   config=GenerationConfig(max_new_tokens=int(sys.argv[4]), do_sample=False),
                   model_config=loaded.config)
    jax.block_until_ready(out.sequences)
    result["generate_seconds"] = time.perf_counter() - start
    result["peak_generate"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["vmhwm"] = hwm()
print(json.dumps(result))
"""


_SIZES = {"gpt2": (768, 12), "gpt2-medium": (1024, 24), "gpt2-large": (1280, 36), "gpt2-xl": (1600, 48)}


def write_checkpoint(directory: Path, preset: str) -> int:
    """Random float32 weights of ``preset`` written with save_hf_directory; returns the file size."""
    import numpy as np

    from gpt2_jax.checkpoints.hf_mapping import expected_shapes
    from gpt2_jax.checkpoints.hf_directory import save_hf_directory
    from gpt2_jax.config import GPT2Config

    config = GPT2Config.from_preset(preset)
    rng = np.random.default_rng(0)
    params: dict = {}
    for path, shape in expected_shapes(config).items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    save_hf_directory(directory, params, config)
    return (directory / "model.safetensors").stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-large", help="gpt2, gpt2-medium, gpt2-large (default), gpt2-xl")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype to load the params as (the file is always float32)")
    parser.add_argument("--no-release", action="store_true",
                        help="do not release the mapped file pages after copying (to see what that saves)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="then generate N greedy tokens (batch 1) in the same process and report the peak RSS "
                             "after preparing the decode weights and after generating (0: load only). Compare "
                             "GPT2_JAX_TUNING=transposed_kernels=0 (no [out, in] kernel copy)")
    parser.add_argument("--keep-params", action="store_true",
                        help="with --generate: prepare the decode weights beside the loaded params (the library's "
                             "cached decode_weights) instead of consuming them as the CLIs do")
    parser.add_argument("--ckpt", default=None, help="an existing checkpoint directory to load instead of writing one")
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)  # internal: the writer child
    args = parser.parse_args()

    if args.write:  # the writer child
        print(write_checkpoint(Path(args.write), args.preset))
        return 0
    n_embd, n_layer = _SIZES[args.preset.split("/")[-1]]
    n_params = 50257 * n_embd + 1024 * n_embd + 2 * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd)
    need = n_params * 4
    parent = Path(args.dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    print(f"{args.preset}: {n_params / 1e6:.0f}M params, {need / 1e9:.2f} GB float32; {free / 1e9:.1f} GB free in "
          f"{parent}")
    if free < need * 1.2:
        print("not enough free disk; pass --dir on a larger filesystem", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="gpt2-jax-mem-", dir=parent))
    ckpt = Path(args.ckpt) if args.ckpt else work / "ckpt"
    try:
        start = time.perf_counter()
        if not args.ckpt:
            writer = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--write", str(ckpt)],
                                    capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if writer.returncode:
                print(writer.stderr, file=sys.stderr)
                return writer.returncode
            size = int(writer.stdout.strip().splitlines()[-1])
            print(f"wrote {size / 1e9:.3f} GB in {time.perf_counter() - start:.1f} s")
        size = (ckpt / "model.safetensors").stat().st_size
        mode = "no-release" if args.no_release else "release"
        done = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), mode, args.dtype, str(args.generate),
                               "keep" if args.keep_params else "consume"],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        peak, baseline, hwm = result["peak"], result["baseline"], result["vmhwm"]
        print(f"load ({args.dtype}, {mode} pages): {result['seconds']:.1f} s")
        print(f"peak RSS {peak / 1e9:.3f} GB = {peak / size:.3f}x the file ({size / 1e9:.3f} GB); "
              f"baseline before loading (python + jax) {baseline / 1e9:.3f} GB; "
              f"peak above baseline {(peak - baseline) / size:.3f}x the file; params {result['params_bytes'] / 1e9:.3f} GB; "
              f"VmHWM {hwm / 1e9:.3f} GB = {hwm / size:.3f}x")
        if args.generate:
            tuning = os.environ.get("GPT2_JAX_TUNING", "default")
            how = "params kept" if args.keep_params else "params consumed, as the CLIs do"
            print(f"then {args.generate} greedy tokens (GPT2_JAX_TUNING={tuning}, {how}), "
                  f"{result['generate_seconds']:.1f} s "
                  f"with compiling: decode weights add {result['prepared_extra_bytes'] / 1e9:.3f} GB; peak RSS after "
                  f"preparing {result['peak_prepared'] / 1e9:.3f} GB = {result['peak_prepared'] / size:.3f}x, after "
                  f"generating {result['peak_generate'] / 1e9:.3f} GB = {result['peak_generate'] / size:.3f}x the file")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work / 'ckpt'}")


if __name__ == "__main__":
    sys.exit(main())
