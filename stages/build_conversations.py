"""build_conversations: LLaVA-Instruct-format conversations about the COCO images (params
``conversations``, ``seed``; reads data/coco). Generated and true to each shapes-world scene, or
llava_instruct_150k.json from the hub (cached, resumable), or a file of your own; validated record by
record. Writes data/conversations/{train,val}.json, turn_types.json and summary.json.
"""
from vlmpipe.core.errors import stage_entry
from vlmpipe.core.stage import stage
from vlmpipe.sources import llava
from vlmpipe.sources.params import CocoParams, ConversationsParams

COCO, OUT = "data/coco", "data/conversations"


@stage_entry
def main() -> None:
    # coco is read for one check: synthetic conversations need the synthetic COCO scenes.
    with stage("build_conversations", {"conversations": ConversationsParams, "coco": CocoParams}) as s:
        summary = llava.build(s.p.conversations, s.p.seed, COCO, OUT)
        s.run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int)})


if __name__ == "__main__":
    raise SystemExit(main())
