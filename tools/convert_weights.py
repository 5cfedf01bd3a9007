"""Convert SDXL weights (the original .safetensors or a diffusers folder) to a MindSpore .ckpt,
or check a checkpoint against a config without converting (--dry_run).

    python tools/convert_weights.py --weight sd_xl_base_1.0.safetensors --output checkpoints/sd_xl_base_1.0_ms.ckpt
    python tools/convert_weights.py --weight sd_xl_base_1.0.safetensors --dry_run

--dry_run reads only the file's header (names and shapes), so it answers in seconds for a 7 GB file.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gm.models.loading import load_config, model_parameter_shapes  # noqa: E402
from gm.util import atomic_write  # noqa: E402
from gm.weights.loader import (  # noqa: E402
    NON_WEIGHT_KEYS, WeightFileError, check_shapes, read_shapes, read_state_dict,
)
from gm.weights.state_dict import WeightMismatchError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", required=True,
                        help="source: sd_xl_base_1.0.safetensors, a diffusers SDXL folder, or a .ckpt")
    parser.add_argument("--config", default="configs/inference/sd_xl_base.yaml",
                        help="the model config the weights must fit (default: %(default)s)")
    parser.add_argument("--output", default="checkpoints/sd_xl_base_1.0_ms.ckpt",
                        help="where to write the MindSpore checkpoint (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                        help="storage precision of the written checkpoint (default: %(default)s, as published)")
    parser.add_argument("--dry_run", action="store_true",
                        help="only check names and shapes against --config and report; write nothing")
    return parser.parse_args(argv)


def checked_shapes(args):
    """{name: shape} of the model --config describes, after checking --weight holds exactly those tensors.

    The file is looked at first, so a missing or broken one is reported before the model is described.
    """
    found = read_shapes(args.weight)
    expected = model_parameter_shapes(load_config(args.config).model)
    check_shapes(expected, found, args.weight)
    return expected, found


def dry_run(args):
    expected, found = checked_shapes(args)
    extras = sorted(k for k in found if k in NON_WEIGHT_KEYS)
    values = sum(int(np.prod(s)) for s in expected.values())
    print(f"OK: {len(found):,} tensors matched in {args.weight}: {len(expected):,} model parameters "
          f"({values:,} values) by name and shape, {len(extras)} known non-weight "
          f"{'entry' if len(extras) == 1 else 'entries'} ignored{': ' if extras else ''}{', '.join(extras)}.")


def convert(args):
    expected, _ = checked_shapes(args)
    import mindspore as ms

    dtype = np.float16 if args.dtype == "fp16" else np.float32
    state = read_state_dict(args.weight)
    params = [{"name": name, "data": ms.Tensor(state.pop(name).astype(dtype, copy=False))} for name in sorted(expected)]
    atomic_write(args.output, lambda tmp: ms.save_checkpoint(params, tmp), ".ckpt")
    print(f"Wrote {len(params):,} tensors ({args.dtype}) to {args.output}")


def main(argv=None):
    args = parse_args(argv)
    try:
        dry_run(args) if args.dry_run else convert(args)
    except (WeightFileError, WeightMismatchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
