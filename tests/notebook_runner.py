"""Execute the committed notebooks in the test suite: ``notebooks/<name>.ipynb`` (outputs committed) paired
through jupytext with ``notebooks/<name>.py`` (percent format, the readable diff).

``execute(name, env)`` runs the notebook's cells as the ``.py`` holds them, in a fresh kernel (nbclient),
with ``env`` added to the kernel's environment (notebooks read their budget from environment variables, e.g.
a small one in tests), and returns the executed notebook; ``printed(nb)`` is everything its cells printed.
``check_paired(name)`` asserts that the ``.ipynb`` holds the same cells as the ``.py``. ``small_env(**extra)`` is
the environment the tests execute notebooks in (the small budget, CPU, the suite's compile cache);
``session_dir(tmp_path_factory)`` a folder every xdist worker of one test session shares.
"""
from __future__ import annotations

import os
import pathlib

import jax
import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def small_env(**extra: str) -> dict[str, str]:
    """The small budget on CPU with the suite's compile cache, plus ``extra`` variables."""
    return {"RLHF_JAX_NOTEBOOK_BUDGET": "small",
            "RLHF_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir or os.path.abspath(".cache/jax_test"),
            "JAX_PLATFORMS": "cpu", **extra}


def session_dir(tmp_path_factory) -> pathlib.Path:
    """A folder shared by the xdist workers of one test session (each worker's base folder is below it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def check_paired(name: str) -> None:
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert _cells(script) == _cells(notebook), (
        f"notebooks/{name}.ipynb differs from notebooks/{name}.py: run jupytext --sync notebooks/{name}.py "
        "and re-execute it")
    assert any(o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])), (
        f"notebooks/{name}.ipynb is committed without outputs")


def execute(name: str, env: dict[str, str] | None = None, timeout_s: int = 900):
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    saved = dict(os.environ)
    try:
        os.environ.pop("XLA_FLAGS", None)  # the kernel gets one CPU device, like a user's laptop
        os.environ.update(env or {})
        client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def printed(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif o.get("output_type") in ("execute_result", "display_data") and "text/plain" in o.get("data", {}):
                out.append(o["data"]["text/plain"] + "\n")
    return "".join(out)
