"""download_coco: COCO 2017 captions into data/coco/ (params ``coco``, ``seed``).

``coco.source: synthetic`` generates the shapes world in the official COCO 2017 format, ``coco2017``
downloads the official archives (cached, resumable); both go through the same ingest. Writes
data/coco/annotations/captions_{train,val}2017.json and data/coco/{train,val}2017.zip (read in place);
the synthetic source also data/coco/annotations/scenes_{train,val}2017.json, the facts of each scene
(its shapes and background) that the captioner's scene score checks captions against.
"""
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.io import atomic_path
from vlmpipe.core.stage import stage
from vlmpipe.sources import coco
from vlmpipe.sources.params import CocoParams

OUT = "data/coco"


@stage_entry
def main() -> None:
    with stage("download_coco", {"coco": CocoParams}) as s, atomic_path(OUT) as tmp:
        coco.build(s.p.coco, s.p.seed, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
