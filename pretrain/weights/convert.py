"""`convert-checkpoint SOURCE --to {hf,timm,native} --out DIR`: weights for downstream fine-tuning and back.

SOURCE is a trainer checkpoint (any ZeRO stage, any number of ranks, local or s3://), a transformers ViT folder, a
timm ViT state dict (or its folder), or a native folder (pretrain/weights/formats.py). A masked-patch checkpoint gives
its encoder. The export carries no classifier unless asked: the paper fine-tunes with a new zero-initialised head,
which `--num-classes K` adds; `--keep-head` keeps the trained one (for inference on the pre-training classes).
`--drop-representation` removes the pre-logits layer as the paper does before fine-tuning, `--image-size` resizes
the position embeddings for another resolution. A transformers export also gets a model card (README.md: the
pre-training data, steps and last evaluation of a trainer checkpoint; pretrain/weights/model_card.py). Tensors
that do not fit the model the source describes (another variant, a damaged file) are refused before anything is
written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.commands import (
    UserError,
    add_storage_option,
    help_description,
    reports_user_errors,
    storage_options,
)

FORMATS = ("hf", "timm", "native")
"""The keys of pretrain.weights.formats.WRITERS, named here so that --help needs no DeepSpeed import."""
DTYPES = ("float32", "bfloat16", "float16")


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert-checkpoint", description=help_description(__doc__))
    parser.add_argument(
        "source",
        help="trainer checkpoint folder (its newest checkpoint) or a step-XXXXXXXX folder "
        "(local or s3://), a transformers ViT folder, a timm state dict or folder, or a native folder",
    )
    parser.add_argument(
        "--to", choices=FORMATS, required=True, help="hf (transformers), timm, or native (what model.init_from reads)"
    )
    parser.add_argument("--out", required=True, help="output folder (local)")
    head = parser.add_mutually_exclusive_group()
    head.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="a new zero-initialised classifier of this many classes, as the paper fine-tunes "
        "(default: no classifier; fine-tuning adds its own)",
    )
    head.add_argument(
        "--keep-head",
        action="store_true",
        help="keep the trained classifier (for inference with the pre-training classes)",
    )
    parser.add_argument(
        "--drop-representation",
        action="store_true",
        help="remove the representation (pre-logits) layer, as the paper does for fine-tuning",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize the position embeddings for this resolution (e.g. 384 for fine-tuning)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written tensors")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="of a trainer checkpoint: ema, optimizer.ema's average of the weights, or raw, the last weights "
        "(default: ema when the checkpoint has one)",
    )
    add_storage_option(parser, "an s3:// checkpoint")
    args = parser.parse_args(argv)
    # imported once the arguments are good: importing DeepSpeed prints the accelerator it found, not for --help
    import torch

    from pretrain.weights.formats import WRITERS, pinned, read_weights, source_format, training_record
    from pretrain.weights.model_card import write_model_card
    from pretrain.weights.model_weights import Weights
    from pretrain.weights.surgery import check_weights, choose_head, resize_positions

    if args.weights and source_format(args.source, storage_options(args)) != "trainer":
        raise UserError(f"{args.source}: --weights chooses among a trainer checkpoint's weights; drop it here")
    source = pinned(args.source, storage_options(args))  # weights and model card from one checkpoint
    weights = read_weights(source, storage_options(args), args.weights)
    check_weights(weights, args.source)
    weights = choose_head(
        weights, keep_head=args.keep_head, num_classes=args.num_classes, drop_representation=args.drop_representation
    )
    if args.image_size:
        weights = resize_positions(weights, args.image_size)
    weights = Weights(weights.model, {k: v.to(getattr(torch, args.dtype)) for k, v in weights.state.items()})
    WRITERS[args.to](weights, Path(args.out))
    if args.to == "hf":
        write_model_card(weights, source, training_record(source, storage_options(args)), Path(args.out))
    print(f"{args.to} weights ({weights.model.summary()}) in {args.out}")
    if not weights.model.num_classes:
        print("no classifier written: --keep-head keeps the trained one, --num-classes K adds a new one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
