"""`unift train` restarts itself once with a preloaded malloc library (unift.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unift import allocator

# Any shared library a bare Python does not load stands in for jemalloc (which CI machines lack): what is
# tested is the restart, the environment it carries and that it happens once.
STAND_IN = next((str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libresolv.so.2"),
                                  Path("/usr/lib/aarch64-linux-gnu/libresolv.so.2"),
                                  Path("/lib64/libresolv.so.2")) if p.is_file()), None)

SCRIPT = textwrap.dedent("""
    import os, sys
    from unift.allocator import in_use, log_line, reexec_with_allocator
    print("start", os.getpid(), flush=True)
    reexec_with_allocator()
    loaded = any(sys.argv[1] in line for line in open("/proc/self/maps"))
    print("in_use", in_use(), "loaded", loaded, "argv", sys.argv[1:])
    print("log", log_line())
""")


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, allocator.MARK, "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


@pytest.mark.skipif(STAND_IN is None or not sys.platform.startswith("linux"), reason="needs Linux's libresolv")
def test_restarts_once_with_the_library_preloaded_and_the_same_arguments():
    done = run({allocator.ENV: STAND_IN}, STAND_IN, "--flag", "value with spaces")
    assert done.returncode == 0, done.stderr
    starts = [line for line in done.stdout.splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # exec: the same process, run again once
    assert f"in_use {STAND_IN} loaded True" in done.stdout
    assert f"'{STAND_IN}', '--flag', 'value with spaces'" in done.stdout


@pytest.mark.skipif(STAND_IN is None, reason="needs Linux's libresolv")
def test_system_choice_or_a_missing_library_keeps_glibc():
    done = run({allocator.ENV: "system"}, STAND_IN)
    assert done.stdout.count("start") == 1 and "in_use None loaded False" in done.stdout
    done = run({allocator.ENV: "/nowhere/libjemalloc.so.2"}, STAND_IN)
    assert done.stdout.count("start") == 1 and "in_use None" in done.stdout
    # said in the run's log once training is under way, never on stderr ahead of the command's own lines
    assert "log memory allocator: warning: UNIFT_ALLOCATOR=/nowhere/libjemalloc.so.2 is not a file" in done.stdout
    assert done.stderr == ""


def test_auto_finds_jemalloc_in_the_conda_environment(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    library = tmp_path / "lib" / "libjemalloc.so.2"
    library.write_bytes(b"")
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.find_jemalloc() == str(library)
    assert allocator.wanted_library() == str(library)
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.wanted_library() is None


def test_the_run_log_names_the_allocator_or_says_what_jemalloc_would_give(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setenv(allocator.MARK, "/opt/lib/libjemalloc.so.2")
    assert allocator.log_line() == "memory allocator: /opt/lib/libjemalloc.so.2 (UNIFT_ALLOCATOR=system to keep glibc's)"
    monkeypatch.delenv(allocator.MARK)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    hint = allocator.log_line()
    assert (hint is None) != sys.platform.startswith("linux")
    assert hint is None or "apt-get install libjemalloc2" in hint
    monkeypatch.setenv(allocator.ENV, "system")  # chosen: nothing to say
    assert allocator.log_line() is None
