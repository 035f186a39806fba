"""`make demo`: build the configured model and take one forward/backward pass on a random batch.

It shows that a config turns into a model of the expected size and cost on this machine; the full pipeline (shards,
DeepSpeed training, evaluation) grows out of it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, load_config
from pretrain.model import create_model, flops_per_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_digits.json", help="JSON run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--batch", type=int, default=8, help="images in the random batch")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2

    torch.manual_seed(config.run.seed)
    model = create_model(config.model.variant, **config.model.model_kwargs())
    size = config.model.image_size
    params = sum(p.numel() for p in model.parameters())
    gflops = flops_per_image(model, size) / 1e9
    print(
        f"{config.run.name}: {config.model.variant} at {size} px, {params / 1e6:.2f}M parameters, "
        f"{gflops:.3f} GFLOPs per image (forward)"
    )

    images = torch.rand(args.batch, 3, size, size)
    start = time.perf_counter()
    outputs = model(images)
    if config.model.num_classes > 0:
        labels = torch.randint(0, config.model.num_classes, (args.batch,))
        loss = F.cross_entropy(outputs.float(), labels)  # a zero-initialised head starts at log(num_classes)
    else:
        loss = outputs.float().pow(2).mean()  # no classifier: any scalar of the representation exercises backward
    loss.backward()
    elapsed = time.perf_counter() - start
    grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    print(
        f"forward+backward on {args.batch} random images in {elapsed:.2f} s: outputs {tuple(outputs.shape)}, "
        f"loss {loss.item():.4f}, gradient norm {grad_norm:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
