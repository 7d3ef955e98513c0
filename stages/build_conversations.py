"""build_conversations: LLaVA-Instruct-format conversations about the COCO images.

Reads params ``seed`` and ``conversations.*``, and data/coco (which images exist, and in which
split). ``conversations.source: synthetic`` generates 2-4-turn conversations true to each
shapes-world scene; ``llava_instruct_150k`` downloads llava_instruct_150k.json of the hub dataset
liuhaotian/LLaVA-Instruct-150K at ``conversations.revision`` (cached in $VLMPIPE_DOWNLOAD_DIR,
resumable) or from ``conversations.url``; ``conversations.path`` uses a file of your own. Every
file is validated (one line naming the record). Writes data/conversations/{train,val}.json in the
LLaVA format, turn_types.json and summary.json.
"""
from vlmpipe.data import llava
from vlmpipe.errors import stage_entry
from vlmpipe.params import flatten, load_params, to_dict
from vlmpipe.sources import preflight
from vlmpipe.tracking import stage_run

COCO, OUT = "data/coco", "data/conversations"


@stage_entry
def main() -> None:
    p = load_params()
    preflight("build_conversations", p)  # anything this or a later stage cannot fetch: one line now
    params = {**flatten({"conversations": to_dict(p.conversations)}), "seed": p.seed}
    with stage_run("build_conversations", params) as run:
        summary = llava.build(p.conversations, p.seed, COCO, OUT)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int)})


if __name__ == "__main__":
    raise SystemExit(main())
