"""explore_data: notebooks/01_data_exploration.ipynb executed on data/coco, data/cifar, data/cifar_qa.csv
and data/conversations (through vlmpipe's readers; no params), as one self-contained page:
reports/data_exploration.html (opens offline too); the same page to MLflow.
"""
from pathlib import Path

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.explore import notebook

NOTEBOOK, OUT = Path("notebooks/01_data_exploration.ipynb"), Path("reports/data_exploration.html")
DATA = (Path("data/coco"), Path("data/cifar"), Path("data/cifar_qa.csv"), Path("data/conversations"))


@stage_entry
def main() -> None:
    with stage("explore_data", {}, top=(), needs=DATA) as s:  # data checked before a kernel starts
        s.run.log_params({"notebook": str(NOTEBOOK), "kernel": notebook.KERNEL,
                          "cell_timeout_s": notebook.CELL_TIMEOUT_S})
        notebook.render(NOTEBOOK, OUT)
        s.run.log_artifact(OUT, "reports")


if __name__ == "__main__":
    raise SystemExit(main())
