"""A step process's start and end: no pandas import for pyarrow's probe, and a fast exit that loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_arrays_are_built_without_importing_pandas_and_pandas_still_works() -> None:
    r = _python("""
        import sys
        from operators.core.startup import skip_pandas_probe
        skip_pandas_probe()
        import pyarrow as pa
        pa.array([1, 2]); pa.table({"a": [1]}); pa.RecordBatch.from_pylist([{"a": 1}])
        print("pandas imported by arrays:", "pandas" in sys.modules)
        import pandas as pd
        print("to_pandas:", type(pa.table({"a": [1, 2]}).to_pandas()).__name__)
        print("from a Series:", pa.array(pd.Series([1, 2])).to_pylist())
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["pandas imported by arrays: False", "to_pandas: DataFrame",
                                     "from a Series: [1, 2]"]


def test_without_the_probe_pyarrow_imports_pandas() -> None:
    # The saving is real only while pyarrow behaves this way; if a pyarrow release stops probing, this fails and
    # skip_pandas_probe can go.
    r = _python("import sys, pyarrow as pa; pa.array([1]); print('pandas' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_a_fast_exit_keeps_its_exit_code_output_and_logs() -> None:
    r = _python("""
        import logging, sys
        from operators.core.startup import exit_process
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        sys.stdout.write("a result line without a newline")
        logging.getLogger("x").info("a log line")
        exit_process(3)
    """)
    assert r.returncode == 3
    assert r.stdout == "a result line without a newline"
    assert "a log line" in r.stderr


def test_exit_waits_for_a_running_worker_thread() -> None:
    # A library thread that is not a daemon still has work to finish: the process exits the ordinary way.
    r = _python("""
        import threading, time
        from operators.core.startup import exit_process
        def work():
            time.sleep(0.3)
            print("the thread finished", flush=True)
        threading.Thread(target=work).start()
        exit_process(0)
    """)
    assert r.returncode == 0 and "the thread finished" in r.stdout, r.stderr


def test_a_step_process_allocates_from_jemalloc_unless_told_otherwise() -> None:
    """`python -m operators` picks Arrow's jemalloc pool before pyarrow loads (it returns freed memory; the
    wheel's mimalloc default kept it, so a task's peak grew with what it had read); an operator's
    ARROW_DEFAULT_MEMORY_POOL still wins."""
    import os

    code = """
        from operators.core.startup import choose_memory_pool
        choose_memory_pool()
        import pyarrow as pa
        print(pa.default_memory_pool().backend_name)
    """
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "jemalloc", r.stderr
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**env, "ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert r.returncode == 0 and r.stdout.strip() == "system", r.stderr
    main = (ROOT / "operators" / "__main__.py").read_text()
    assert main.index("start_process()") < main.index("from operators.cli")  # before pyarrow's import
