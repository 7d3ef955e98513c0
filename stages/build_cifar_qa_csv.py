"""build_cifar_qa_csv: CIFAR-10 python batches and the Q/A CSV (params ``cifar``, ``qa``, ``seed``).

Writes data/cifar/cifar-10-batches-py/ (generated shapes, or the official md5-verified tarball) and
data/cifar_qa.csv: generated from the images and the facts table, or ``qa.csv_path`` once it validates,
in the same columns, with its held-out images settled (``qa.split``, ``qa.heldout_fraction``).
"""
import logging

from vlmpipe.core.errors import stage_entry
from vlmpipe.core.io import atomic_path
from vlmpipe.core.stage import stage
from vlmpipe.sources import cifar, qa
from vlmpipe.sources.params import CifarParams, QaParams

CIFAR_OUT, CSV_OUT = "data/cifar", "data/cifar_qa.csv"


@stage_entry
def main() -> None:
    with stage("build_cifar_qa_csv", {"cifar": CifarParams, "qa": QaParams}) as s:
        # Both outputs are made in scratch places and move into place together, once everything is
        # checked: a refused CSV leaves the earlier data/cifar, not new batches beside an old CSV.
        with atomic_path(CIFAR_OUT) as cifar_tmp, atomic_path(CSV_OUT) as csv_tmp:
            cifar.build(s.p.cifar, s.p.seed, cifar_tmp)
            if s.p.qa.csv_path:  # a one-line UserError on the first problem
                df = qa.write_user_csv(s.p.qa.csv_path, csv_tmp, cifar_tmp, s.p.qa.split, s.p.qa.heldout_fraction,
                                       s.p.seed)
            else:
                df = qa.write_qa_csv(csv_tmp, cifar_tmp, s.p.seed, s.p.qa.questions_per_image)
        # Named once in place: the scratch path it was written under is gone.
        logging.getLogger("build_cifar_qa_csv").info("%s: %d rows", CSV_OUT, len(df))


if __name__ == "__main__":
    raise SystemExit(main())
