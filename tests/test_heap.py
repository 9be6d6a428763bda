"""gpt2_jax.heap: training commands restart once with glibc keeping freed memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from gpt2_jax import cli, heap

LINUX_GLIBC = dict(system="Linux", libc="glibc")


def test_the_restart_environment_adds_the_settings_and_marks_itself():
    env = heap.kept_heap_environment({"PATH": "/bin"}, **LINUX_GLIBC)
    assert env == {"PATH": "/bin", **heap.KEPT_HEAP_SETTINGS, heap.KEEP_HEAP_ENV: "0"}
    assert heap.kept_heap_environment(env, **LINUX_GLIBC) is None  # the restarted process does not restart again


@pytest.mark.parametrize("environ,where", [
    ({heap.KEEP_HEAP_ENV: "0"}, LINUX_GLIBC),  # opted out
    ({heap.KEEP_HEAP_ENV: "off"}, LINUX_GLIBC),
    ({"MALLOC_ARENA_MAX": "4"}, LINUX_GLIBC),  # the user chose malloc settings: left alone
    ({}, dict(system="Darwin", libc="")),
    ({}, dict(system="Linux", libc="")),  # musl and other libcs ignore glibc's tunables
])
def test_no_restart_when_it_does_not_apply(environ, where):
    assert heap.kept_heap_environment(environ, **where) is None


def _run(code: str, **extra_env) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != heap.KEEP_HEAP_ENV}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout


RESTARTING = (
    "from gpt2_jax import heap; print('first', flush=True); "
    "heap.restart_with_kept_heap(['-c', 'import os; print(os.environ[\"MALLOC_MMAP_MAX_\"], "
    "os.environ[\"MALLOC_ARENA_MAX\"], os.environ[\"GPT2_JAX_KEEP_HEAP\"])']); print('not restarted')"
)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_restart_replaces_the_process_with_the_settings():
    assert _run(RESTARTING).split() == ["first", "0", "1", "0"]


def test_restart_can_be_turned_off():
    assert _run(RESTARTING, GPT2_JAX_KEEP_HEAP="0").split() == ["first", "not", "restarted"]


def test_train_keeps_the_heap_and_in_process_main_never_restarts(monkeypatch):
    assert "train" in cli.KEEPS_HEAP
    calls = []
    monkeypatch.setattr(heap, "restart_with_kept_heap", lambda args: calls.append(args))
    with pytest.raises(SystemExit):  # --help exits after parsing; a caller's main(argv) never restarts
        cli.main(["train", "--help"])
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["gpt2-jax", "train", "--definitely-not-an-option"])
    with pytest.raises(SystemExit):  # a bad argument fails in parsing, before any restart
        cli.main()
    assert calls == []

    class Restarted(Exception):
        pass

    def restart(args):
        calls.append(args)
        raise Restarted  # stands in for os.execve, which does not return

    monkeypatch.setattr(heap, "restart_with_kept_heap", restart)
    monkeypatch.setattr(sys, "argv", ["gpt2-jax", "train", "--out", "run-dir"])
    with pytest.raises(Restarted):
        cli.main()
    assert calls == [["-m", "gpt2_jax.cli", "train", "--out", "run-dir"]]
