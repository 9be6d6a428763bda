"""Encoding throughput: gpt2_jax.GPT2Tokenizer (tiktoken) vs Hugging Face `tokenizers` byte-level BPE.

Both tokenizers use the same GPT-2 ranks (HF's vocab.json/merges.txt are written by
`save_pretrained`), run on the same deterministic few-MB text in the same process,
and must produce identical ids. Reports the median of several runs in tokens/s.

    python benchmarks/bench_tokenizer.py [--mb 4] [--runs 5]
"""

from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)
import argparse
import os
import random
import tempfile

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # single-threaded HF unless a row turns it on

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from gpt2_jax.tokenizer import GPT2Tokenizer  # noqa: E402

PARAGRAPHS = [
    "The theory of relativity usually encompasses two interrelated physics theories by Albert Einstein: "
    "special relativity and general relativity, proposed and published in 1905 and 1915, respectively.",
    "def train_step(state, batch):\n    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)\n"
    "    return state.apply_gradients(grads=grads), {'loss': loss}\n",
    "I'm sure they'll say it's fine; we've tried, you'd agree?  Numbers: 3.14159, 2,718, 1e-6, 2024-06-25.",
    "東京は日本の首都であり、世界最大級の都市圏を形成している。北京是中华人民共和国的首都。",
    "Москва — столица России, город федерального значения. Съешь же ещё этих мягких булок.",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها. नई दिल्ली भारत की राजधानी है।",
    "Emoji 😀 🎉 👍🏽 👨‍👩‍👧‍👦 and whitespace\t\ttabs\n\n\n    indented    runs   ",
]
SYLLABLES = ["ka", "lo", "mi", "ter", "on", "ex", "str", "qu", "ia", "ph", "zz", "ent", "ly", "ing", "ру", "ба", "数", "ای"]


def make_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """Deterministic documents (~1 KB each): shuffled paragraphs plus pseudo-random words."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        parts = rng.sample(PARAGRAPHS, 3)
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(20, 80))]
        parts.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "\n"]))
        rng.shuffle(parts)
        doc = "\n".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs




def median_after_warmup(fn, runs: int) -> float:
    fn()  # warm-up
    return median_seconds(fn, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="size of the generated text in MB")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    args = parser.parse_args()

    ours = GPT2Tokenizer()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = Tokenizer(models.BPE.from_file(f"{d}/vocab.json", f"{d}/merges.txt"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()

    docs = make_corpus(args.mb)
    text = "\n".join(docs)
    n_whole = len(ours.encode(text))
    assert ours.encode(text) == hf.encode(text).ids, "tokenizers disagree on the whole text"
    batch_ids = ours.encode_batch(docs)
    assert batch_ids == [e.ids for e in hf.encode_batch(docs)], "tokenizers disagree on the batch"
    n_batch = sum(map(len, batch_ids))

    def hf_parallel(fn):
        def run():
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            try:
                fn()
            finally:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
        return run

    rows = [
        ("whole text, 1 call", n_whole, lambda: ours.encode(text), lambda: hf.encode(text)),
        ("batch, 1 thread", n_batch, lambda: ours.encode_batch(docs), lambda: hf.encode_batch(docs)),
        ("batch, 1 thread (HF encode_batch_fast)", n_batch, lambda: ours.encode_batch(docs),
         lambda: hf.encode_batch_fast(docs)),
        (f"batch, {os.cpu_count()} threads", n_batch,
         lambda: ours.encoding.encode_ordinary_batch(docs, num_threads=os.cpu_count()),
         hf_parallel(lambda: hf.encode_batch_fast(docs))),
    ]
    print(f"text: {len(text.encode()) / 1e6:.2f} MB, {len(docs)} documents, {n_whole:,} tokens; "
          f"median of {args.runs} runs")
    print(f"{'case':<42}{'gpt2_jax tok/s':>16}{'HF tokenizers tok/s':>22}{'ratio':>8}")
    for name, n_tokens, ours_fn, hf_fn in rows:
        if name.endswith("encode_batch_fast)") and not hasattr(hf, "encode_batch_fast"):
            continue
        t_ours, t_hf = median_after_warmup(ours_fn, args.runs), median_after_warmup(hf_fn, args.runs)
        print(f"{name:<42}{n_tokens / t_ours:>16,.0f}{n_tokens / t_hf:>22,.0f}{t_hf / t_ours:>7.2f}x")
    print("ratio = gpt2_jax throughput / HF tokenizers throughput")


if __name__ == "__main__":
    main()
