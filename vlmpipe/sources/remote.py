"""Where the full preset's downloads come from: the published addresses, sizes and checksums.

One table, read by the stages that download (``data/coco.py``, ``data/cifar.py``,
``models/image_tower.py``) and by the preflight that checks them early (``sources.py``);
keeping it here means checking a URL does not import the code that uses it.
"""
from __future__ import annotations

# COCO 2017: name -> (url, size in bytes, md5), as published.
COCO_2017 = {
    "annotations_trainval2017.zip": ("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                                     252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    "train2017.zip": ("http://images.cocodataset.org/zips/train2017.zip", 19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017.zip": ("http://images.cocodataset.org/zips/val2017.zip", 815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
}
COCO_HOST = "cocodataset.org"  # a mirror's base URL replaces everything up to the path after this

# CIFAR-10, python version.
CIFAR_10 = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170498071, "c58f30108f718f92721af3b95e74349a")

# The ImageNet weights each torchvision backbone starts from (torchvision's IMAGENET1K_V2 for
# ResNet-50, V1 for ResNet-18); the file name ends in the first digits of its sha256.
IMAGENET_WEIGHTS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def coco_url(name: str, mirror: str = "") -> str:
    """The URL of COCO file ``name``, at ``mirror`` (a base URL) when given."""
    url = COCO_2017[name][0]
    return mirror.rstrip("/") + url.split(COCO_HOST, 1)[1] if mirror else url


# Karpathy's split of COCO (train / restval / val / test by cocoid), the one captioning papers report
# scores on: dataset_coco.json inside caption_datasets.zip (with the Flickr8k and Flickr30k splits),
# linked from https://cs.stanford.edu/people/karpathy/deepimagesent/. No size or checksum is
# published for it: ``coco.split_sha256`` pins a copy.
KARPATHY_SPLITS = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
KARPATHY_FILE = "dataset_coco.json"


def karpathy_split(mirror: str = "") -> tuple[str, str]:
    """The URL of the split file (``mirror``: a URL of caption_datasets.zip or dataset_coco.json) and the
    name it is downloaded under."""
    url = mirror or KARPATHY_SPLITS
    return url, url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or KARPATHY_FILE

# LLaVA-Instruct-150K: the conversations file of the hub dataset, at a revision (branch or commit).
LLAVA_DATASET, LLAVA_FILE = "liuhaotian/LLaVA-Instruct-150K", "llava_instruct_150k.json"


def llava_url(revision: str = "main") -> str:
    return f"https://huggingface.co/datasets/{LLAVA_DATASET}/resolve/{revision}/{LLAVA_FILE}"
