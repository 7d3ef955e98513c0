"""Params of the data stages: ``coco`` (download_coco), ``cifar`` and ``qa`` (build_cifar_qa_csv),
``conversations`` (build_conversations)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from vlmpipe.core.params import check, check_input_path, check_revision, check_url


def check_source(key: str, source: str, sources: tuple[str, ...], url: str, local_key: str, local: str,
                 verify: bool) -> None:
    """What every downloaded data set's section shares: a known ``source``; a mirror ``url`` or a local
    copy, not both; a local copy under inputs/data/ unless ``verify`` pins its content by the published
    md5 (without it, DVC must watch the file)."""
    check(source in sources, f"{key}.source", f"must be {' or '.join(map(repr, sources))}, got {source!r}")
    check(not (url and local), f"{key}.{local_key}", f"set either url or {local_key}, not both")
    if not verify:
        check_input_path(local, f"{key}.{local_key}", "data")
    check_url(url, f"{key}.url")


@dataclass
class CocoParams:
    # "synthetic": the offline shapes world written in COCO 2017 format;
    # "coco2017": the official archives.
    source: str = "synthetic"
    # Images per split to keep (deterministic subset); 0 keeps all.
    max_images: int = 0
    synthetic_train_images: int = 2000
    synthetic_val_images: int = 250
    image_size: int = 64
    # Where coco2017 comes from. ``url``: a mirror's base URL standing in for
    # http://images.cocodataset.org (same paths below it); ``local_dir``: a folder already
    # holding the three official archives, used in place and never modified; both empty: the
    # official site. ``verify``: check the published size and md5 (false for a mirror or copy
    # that serves other bytes, e.g. a re-packed archive).
    url: str = ""
    local_dir: str = ""
    verify: bool = True
    # Which images make the train and val splits. "coco2017": train2017 and val2017 as COCO
    # publishes them; "karpathy": Karpathy's split, as captioning papers report scores (train: its
    # train + restval, 113,287 images; val: its test, 5,000), images and captions taken from the
    # coco2017 archives (needs source: coco2017). The split file, dataset_coco.json or Karpathy's
    # caption_datasets.zip holding it: ``split_path`` (under inputs/data/), else ``split_url`` (a
    # mirror's URL of either file), else Karpathy's site. ``split_sha256``: the sha256 that file
    # must have (no checksum is published for it; empty: not checked, the stage logs the file's).
    split: str = "coco2017"
    split_url: str = ""
    split_path: str = ""
    split_sha256: str = ""

    def validate(self, key: str) -> None:
        check_source(key, self.source, ("synthetic", "coco2017"), self.url, "local_dir", self.local_dir, self.verify)
        check(self.split in ("coco2017", "karpathy"), f"{key}.split",
              f"must be 'coco2017' or 'karpathy', got {self.split!r}")
        check(self.split != "karpathy" or self.source == "coco2017", f"{key}.split",
              "karpathy names COCO images by id: it needs coco.source: coco2017")
        check(not (self.split_url and self.split_path), f"{key}.split_path", "set either split_url or split_path, not both")
        check_input_path(self.split_path, f"{key}.split_path", "data")
        check_url(self.split_url, f"{key}.split_url")
        check(not self.split_sha256 or re.fullmatch(r"[0-9a-fA-F]{64}", self.split_sha256) is not None,
              f"{key}.split_sha256", f"must be 64 hex digits (a sha256) or empty, got {self.split_sha256!r}")
        check(self.max_images >= 0, f"{key}.max_images", "must be >= 0")
        check(self.synthetic_train_images > 0, f"{key}.synthetic_train_images", "must be > 0")
        check(self.synthetic_val_images > 0, f"{key}.synthetic_val_images", "must be > 0")
        check(32 <= self.image_size <= 1024, f"{key}.image_size", "must be between 32 and 1024")


@dataclass
class CifarParams:
    # "synthetic": generated 10-class shapes in CIFAR-10 batch format;
    # "cifar10": the official python tarball.
    source: str = "synthetic"
    synthetic_train_per_class: int = 500
    synthetic_test_per_class: int = 100
    # Where cifar10 comes from: ``url``, the full URL of a mirror's cifar-10-python.tar.gz;
    # ``local_path``: a copy of that file on disk (used in place, never modified); both empty:
    # the official site. ``verify``: check the published size and md5.
    url: str = ""
    local_path: str = ""
    verify: bool = True

    def validate(self, key: str) -> None:
        check_source(key, self.source, ("synthetic", "cifar10"), self.url, "local_path", self.local_path, self.verify)
        check(self.synthetic_train_per_class > 0, f"{key}.synthetic_train_per_class", "must be > 0")
        check(self.synthetic_test_per_class > 0, f"{key}.synthetic_test_per_class", "must be > 0")


@dataclass
class QaParams:
    # Empty: generate data/cifar_qa.csv. A path: validate and use that CSV (formats: inputs/README.md).
    csv_path: str = ""
    questions_per_image: int = 5
    # The CIFAR split a user's CSV without a Split column indexes: "train", "test", or "auto" (the one
    # whose images' labels match every row's Class_Label; logged; train if both do).
    split: str = "auto"
    # A user's CSV about one split only, without a Heldout column: this fraction of its images (seeded,
    # by image) is held out for evaluation.
    heldout_fraction: float = 0.1

    def validate(self, key: str) -> None:
        check(1 <= self.questions_per_image <= 5, f"{key}.questions_per_image", "must be between 1 and 5")
        check_input_path(self.csv_path, f"{key}.csv_path", "data")
        check(self.split in ("auto", "train", "test"), f"{key}.split",
              f"must be 'auto', 'train' or 'test', got {self.split!r}")
        check(0 < self.heldout_fraction < 1, f"{key}.heldout_fraction", "must be in (0, 1)")


@dataclass
class ConversationsParams:
    """Where build_conversations gets its LLaVA-Instruct-format conversations (vlmpipe/data/llava.py)."""

    # "synthetic": generated from the shapes-world COCO scenes (needs coco.source: synthetic);
    # "llava_instruct_150k": llava_instruct_150k.json of the hub dataset liuhaotian/LLaVA-Instruct-150K.
    source: str = "synthetic"
    # A LLaVA-format JSON of your own under inputs/data/ (validated, used in place of ``source``).
    path: str = ""
    # synthetic: conversations per training image (held-out images get one each, whatever this is).
    per_image: int = 5
    # llava_instruct_150k: the dataset's hub revision (a commit hash pins the file), or ``url``: a
    # mirror's URL of llava_instruct_150k.json in place of the hub's.
    revision: str = "main"
    url: str = ""
    # Conversations about train2017 images held out for evaluation (by image, seeded) when no
    # conversation is about a val2017 image (LLaVA-Instruct-150K has none).
    heldout_fraction: float = 0.02
    # Keep at most this many training conversations (a seeded subset); 0 keeps all.
    max_conversations: int = 0
    # Conversations without an image (LLaVA-1.5's mix holds ShareGPT's): "skip" drops and counts them;
    # "train" trains them as text-only turns (the LM attends to no image prefix; never held out).
    text_only: str = "skip"

    def validate(self, key: str) -> None:
        check(self.source in ("synthetic", "llava_instruct_150k"), f"{key}.source",
              f"must be 'synthetic' or 'llava_instruct_150k', got {self.source!r}")
        check_input_path(self.path, f"{key}.path", "data")
        check(1 <= self.per_image <= 10, f"{key}.per_image", "must be between 1 and 10")
        check_revision(self.revision, f"{key}.revision")
        check_url(self.url, f"{key}.url")
        check(0 < self.heldout_fraction < 1, f"{key}.heldout_fraction", "must be in (0, 1)")
        check(self.max_conversations >= 0, f"{key}.max_conversations", "must be >= 0")
        check(self.text_only in ("skip", "train"), f"{key}.text_only",
              f"must be 'skip' or 'train', got {self.text_only!r}")
