"""Command line use of the trained models.

    python -m vlmpipe caption IMAGE [IMAGE ...] [--model models/captioner] [--beam-size N]
    python -m vlmpipe ask IMAGE "question" [--history "q1" "a1" ...] [--model models/phi2_vlm]
    python -m vlmpipe chat IMAGE [--message "..." ...] [--model chat|qa|DIR]
    python -m vlmpipe serve [--port 7860] [--host 127.0.0.1]
    python -m vlmpipe predict --model DIR INPUT [--output OUT.jsonl] [--question "..."] [--batch-size N]
    python -m vlmpipe export MODEL_DIR OUT

All are deterministic (greedy or beam search, no sampling).
"""
from __future__ import annotations

import argparse
import sys

from vlmpipe.core.errors import UserError, stage_entry


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vlmpipe", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("caption", help="caption image files with the trained captioner")
    cap.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    cap.add_argument("--model", default="models/captioner", help="captioner directory (default: %(default)s)")
    cap.add_argument("--beam-size", type=int, default=None,
                     help="beam width; 1 is greedy (default: the value the model was trained with)")

    ask = sub.add_parser("ask", help="ask the visual QA model a question about an image")
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help="the question")
    ask.add_argument("--history", nargs="*", default=[], metavar="TEXT",
                     help="earlier turns as alternating question and answer")
    ask.add_argument("--model", default="models/phi2_vlm", help="QA model directory (default: %(default)s)")

    ch = sub.add_parser("chat", help="a multi-turn conversation about an image (/reset, /quit)")
    ch.add_argument("image", help="image file")
    ch.add_argument("--message", action="append", default=[], metavar="TEXT",
                    help="answer this message and exit (repeatable: a conversation, one reply per line)")
    ch.add_argument("--model", default="chat",
                    help="chat (models/chat), qa (the Phi-2 QA model, models/phi2_vlm) or a model folder "
                         "(default: %(default)s)")

    pr = sub.add_parser("predict", help="caption, or answer questions about, a folder, CSV or JSON Lines file of "
                                        "images in batches (JSON Lines out)")
    pr.add_argument("input", help="a folder of images, a CSV (an image or image_path column, optionally question) "
                                  "or a JSON Lines file of {\"image\": ..., \"question\" or \"messages\": ...}; "
                                  "image paths are relative to the file's folder")
    pr.add_argument("--model", required=True, metavar="DIR", help="a captioner, QA or chat model folder (or an export)")
    pr.add_argument("--output", "-o", default=None, metavar="OUT.jsonl",
                    help="write the records here, whole or not at all (default: stdout)")
    pr.add_argument("--question", default=None, help="the question for rows that have none (a folder's images)")
    pr.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")

    ex = sub.add_parser("export", help="a trained model as one self-contained folder (the QA model's LoRA merged "
                                       "into its dequantised base) with a model card")
    ex.add_argument("model_dir", metavar="MODEL_DIR", help="a captioner, QA or chat model folder, e.g. models/phi2_vlm")
    ex.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    ex.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the QA model is merged: fp32 on a CPU, bf16 on CUDA (default: %(default)s)")

    sv = sub.add_parser("serve", help="a local web demo: caption an image, ask about it, chat (Ctrl-C stops it)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port (default: %(default)s)")
    sv.add_argument("--captioner", default="models/captioner", help="captioner directory (default: %(default)s)")
    sv.add_argument("--qa", default="models/phi2_vlm", help="QA model directory (default: %(default)s)")
    sv.add_argument("--chat", default="models/chat", help="chat model directory (default: %(default)s)")
    sv.add_argument("--coco", default="data/coco",
                    help="data/coco folder whose held-out scenes the page offers the captioner and chat model "
                         "(default: %(default)s)")
    sv.add_argument("--conversations", default="data/conversations",
                    help="held-out conversations (val.json) whose questions the scenes come with (default: %(default)s)")
    sv.add_argument("--qa-csv", default="data/cifar_qa.csv",
                    help="Q/A CSV whose held-out rows the page offers the QA model, with their questions "
                         "(default: %(default)s)")
    sv.add_argument("--cifar", default="data/cifar", help="the CIFAR folder the Q/A CSV indexes (default: %(default)s)")
    return ap


@stage_entry
def _run(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    # Imported here, not at the top: --help and usage errors answer at once, without loading torch.
    from vlmpipe.face import api as cli

    if args.command == "caption":
        for path, text in zip(args.images, cli.caption_files(args.model, args.images, beam_size=args.beam_size)):
            sys.stdout.write(f"{path}\t{one_line_error(text)}\n")
    elif args.command == "predict":
        from vlmpipe.face import predict

        predict.run(args.model, args.input, args.output, device=args.device, batch_size=args.batch_size,
                    question=args.question)
    elif args.command == "export":
        from vlmpipe.face.export import export

        export(args.model_dir, args.out, device=args.device)
    elif args.command == "serve":
        from vlmpipe.face.serve import serve

        serve(args.host, args.port, args.captioner, args.qa, args.chat, args.coco, cifar=args.cifar,
              qa_csv=args.qa_csv, conversations=args.conversations)
    elif args.command == "chat":
        cli.chat(args.image, args.model, args.message, write=lambda text: print(one_line_error(text), flush=True))
    else:
        if len(args.history) % 2:
            raise UserError("--history: give question and answer pairs (an even number of texts)")
        turns = list(zip(args.history[0::2], args.history[1::2]))
        sys.stdout.write(one_line_error(cli.ask_file(args.model, args.image, args.question, history=turns)) + "\n")


def one_line_error(text: str) -> str:
    """A generated text as one output line: a model may emit tabs or newlines, which would split a
    caption's TSV row or an answer into several lines for the script reading them."""
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    return _run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
