"""build_cifar_qa_csv: CIFAR-10 python batches and the Q/A CSV.

Reads params ``seed``, ``cifar.*`` and ``qa.*``. Writes data/cifar/cifar-10-batches-py/
(generated shapes for ``cifar.source: synthetic``, the official md5-verified
tarball for ``cifar10``) and data/cifar_qa.csv: generated from the images and the
facts table, or, when ``qa.csv_path`` is set, that CSV once it validates.
"""
from pathlib import Path

from vlmpipe.data import cifar, qa
from vlmpipe.errors import stage_entry
from vlmpipe.io import atomic_path, write_bytes
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run

CIFAR_OUT = "data/cifar"
CSV_OUT = "data/cifar_qa.csv"


@stage_entry
def main() -> None:
    p = load_params()
    preflight("build_cifar_qa_csv", p)  # anything this or a later stage cannot fetch: one line now
    params = {**flatten({"cifar": to_dict(p.cifar), "qa": to_dict(p.qa)}), "seed": p.seed}
    with stage_run("build_cifar_qa_csv", params):
        with atomic_path(CIFAR_OUT) as tmp:
            cifar.build(p.cifar, p.seed, tmp)
        if p.qa.csv_path:
            qa.read_qa_csv(p.qa.csv_path, CIFAR_OUT)  # raises a one-line UserError on the first problem
            write_bytes(CSV_OUT, Path(p.qa.csv_path).read_bytes())
        else:
            qa.write_qa_csv(CSV_OUT, CIFAR_OUT, p.seed, p.qa.questions_per_image)


if __name__ == "__main__":
    raise SystemExit(main())
