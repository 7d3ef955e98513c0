"""download_coco: COCO 2017 captions into data/coco/.

Reads params ``seed`` and ``coco.*``. ``coco.source: synthetic`` generates the
shapes world in the official COCO 2017 format, ``coco2017`` downloads the
official archives (cached in $VLMPIPE_DOWNLOAD_DIR, resumable); both go through
the same ingest. Writes data/coco/annotations/captions_{train,val}2017.json and
data/coco/{train,val}2017.zip (images read in place, never extracted).
"""
from vlmpipe.data import coco
from vlmpipe.errors import stage_entry
from vlmpipe.io import atomic_path
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run

OUT = "data/coco"


@stage_entry
def main() -> None:
    p = load_params()
    preflight("download_coco", p)  # anything this or a later stage cannot fetch: one line now
    with stage_run("download_coco", {**flatten({"coco": to_dict(p.coco)}), "seed": p.seed}):
        with atomic_path(OUT) as tmp:
            coco.build(p.coco, p.seed, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
