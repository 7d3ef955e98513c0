"""explore_data: the data-exploration notebook, executed on this repository's data, as one HTML page.

Reads:  notebooks/01_data_exploration.ipynb, which reads data/coco, data/cifar + data/cifar_qa.csv
        and data/conversations through vlmpipe's readers (no params).
Writes: reports/data_exploration.html (self-contained: open it in any browser, offline too);
        the same page to MLflow.
"""
from __future__ import annotations

from pathlib import Path

from vlmpipe import notebook
from vlmpipe.errors import UserError, stage_entry
from vlmpipe.tracking import stage_run

NOTEBOOK = Path("notebooks/01_data_exploration.ipynb")
OUT = Path("reports/data_exploration.html")
DATA = (Path("data/coco"), Path("data/cifar"), Path("data/cifar_qa.csv"), Path("data/conversations"))


@stage_entry
def main() -> None:
    for need in DATA:  # said now, before a kernel starts, rather than from inside a cell
        if not need.exists():
            raise UserError(f"{need}: missing upstream output (run `dvc repro` to build it)")
    with stage_run("explore_data", {"notebook": str(NOTEBOOK), "kernel": notebook.KERNEL,
                                    "cell_timeout_s": notebook.CELL_TIMEOUT_S}) as run:
        notebook.render(NOTEBOOK, OUT)
        run.log_artifact(OUT, "reports")


if __name__ == "__main__":
    raise SystemExit(main())
