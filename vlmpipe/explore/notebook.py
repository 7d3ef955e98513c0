"""Execute a notebook and render it to one self-contained HTML page (the explore_data stage).

The notebook runs top to bottom in a fresh ``python3`` kernel whose working directory is the
repository root (nbclient), and is exported with nbconvert's ``lab`` template. Two runs on the
same data give the same bytes: nothing that changes from run to run (timings, the kernel's own
messages on stderr) reaches the page, and the page fetches nothing from the network.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from jupyter_client.kernelspec import NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from traitlets.config import Config

from vlmpipe.core.errors import UserError, one_line
from vlmpipe.core.io import write_text

log = logging.getLogger(__name__)

KERNEL = "python3"
CELL_TIMEOUT_S = 600  # per cell; the full preset's 118k COCO captions load in seconds, not minutes

# The lab template without the <script src=...> tags in its <head>: require.js (widgets), MathJax
# and mermaid come from a CDN, and a script in <head> keeps a browser without internet from showing
# the page until the request gives up. The report has no widgets, math or diagrams; the template
# inlines its CSS and the plots are data: URIs, so the page needs nothing else.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js %}{% endblock html_head_js %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
"""


def execute(path: str | Path, cwd: str | Path = ".") -> nbformat.NotebookNode:
    """The notebook at ``path``, executed in a fresh kernel started in ``cwd``.

    A cell that raises, hangs past ``CELL_TIMEOUT_S`` or kills the kernel is one ``UserError``
    naming the notebook and the cell (its position and first line) with the cell's error.
    """
    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as e:  # nbformat raises several unrelated types for a file that is not a notebook
        raise UserError(f"{path}: not a Jupyter notebook ({type(e).__name__}: {str(e)[:200]})") from None
    current = {"index": -1}
    with tempfile.TemporaryDirectory(prefix="vlmpipe-kernel-") as tmp:
        # Unix sockets in a private folder rather than TCP ports on 127.0.0.1: no port to race
        # for, nothing another local user can connect to, and no "running over TCP without
        # encryption" warning from ipykernel in every `dvc repro`.
        config = Config({"KernelManager": {"transport": "ipc", "ip": f"{tmp}/kernel",
                                           "connection_file": f"{tmp}/kernel.json"}})
        client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, record_timing=False,
                                resources={"metadata": {"path": str(cwd)}}, config=config,
                                on_cell_start=lambda cell, cell_index: current.update(index=cell_index))
        try:
            client.execute(env=_kernel_env())
        except NoSuchKernel:
            raise UserError(f"{path}: no Jupyter kernel {KERNEL!r} (pip install ipykernel)") from None
        except CellExecutionError as e:
            raise UserError(f"{path}: {_cell(nb, current['index'])} failed: {e.ename}: {e.evalue[:500]}") from None
        except CellTimeoutError:
            raise UserError(f"{path}: {_cell(nb, current['index'])} ran longer than {CELL_TIMEOUT_S} s") from None
        except DeadKernelError:
            raise UserError(f"{path}: the kernel died in {_cell(nb, current['index'])} (out of memory?)") from None
    return nb


def _kernel_env() -> dict[str, str]:
    # The inline backend whatever MPLBACKEND the caller exported (under Agg no figure would show),
    # and one string hash: set and dict orders built from strings are then the same every run.
    return {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONHASHSEED": "0"}


def _cell(nb: nbformat.NotebookNode, index: int) -> str:
    """``cell 7 of 31 ('coco = load()')``: its place in the notebook, and how it starts."""
    if not 0 <= index < len(nb.cells):
        return "a cell"
    first = next((line.strip() for line in nb.cells[index].source.splitlines() if line.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    return f"cell {index + 1} of {len(nb.cells)} ({first!r})"


def scrub(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what differs between two runs of ``nb`` on the same data, in place; return ``nb``.

    Timings (``metadata.execution``, written when timing is recorded), display ids (``transient``)
    and stderr streams: logging, warnings and progress bars carry timestamps, rates and absolute
    paths. Those go to this process's log instead, so a warning is still seen. Consecutive stdout
    pieces are joined into one output: how the kernel splits a cell's prints into messages depends
    on timing (two prints came as one output in one run and as two under load in another).
    """
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            out.pop("transient", None)
            if out.output_type == "stream" and out.name == "stderr":
                log.info("notebook cell %d, stderr: %s", i + 1, one_line(out.text.strip())[:1000])
            elif out.output_type == "stream" and kept and kept[-1].output_type == "stream":
                kept[-1].text += out.text
            else:
                kept.append(out)
        cell.outputs = kept
    nb.metadata.pop("widgets", None)
    return nb


# nbconvert warns on every run that the figures have no alternative text (matplotlib's inline PNGs
# never carry one, and it writes a placeholder): nothing to act on, so only its errors are shown.
_exporter_log = logging.getLogger(f"{__name__}.nbconvert")
_exporter_log.setLevel(logging.ERROR)


def to_html(nb: nbformat.NotebookNode, title: str) -> str:
    """``nb`` as one HTML page (lab template, CSS inline, no scripts fetched)."""
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2", log=_exporter_log)
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return html


def render(notebook: str | Path, dest: str | Path, cwd: str | Path = ".") -> Path:
    """Execute ``notebook`` in ``cwd`` and write it to ``dest`` as HTML, atomically (a failing cell
    writes nothing and leaves an earlier ``dest`` as it was)."""
    nb = scrub(execute(notebook, cwd))
    write_text(dest, to_html(nb, Path(notebook).stem))
    return Path(dest)
