"""The `harmon` command."""

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert

    convert(
        checkpoint=args.checkpoint,
        vae=args.vae,
        config=args.config,
        output=args.output,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
    )
    print(f"Saved the converted model to {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmon", description="Harmon: unified image understanding and generation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert the released weights into a model folder",
        description="Convert a released Harmon checkpoint and its KL-16 VAE into a transformers model folder "
        "(safetensors), loadable with AutoModel.from_pretrained(folder, trust_remote_code=True).",
    )
    convert.add_argument("--checkpoint", required=True, help="harmon_0.5b.pth, harmon_1.5b.pth or harmon_1.5b-o.pth")
    convert.add_argument("--vae", required=True, help="kl16.ckpt")
    convert.add_argument(
        "--config", required=True, help="0.5b, 1.5b, or a JSON file of the reference's constructor arguments"
    )
    convert.add_argument(
        "--tokenizer",
        help="a Qwen2.5-Instruct tokenizer (folder or Hub id): <image> is added and saved beside the model",
    )
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    convert.add_argument("--output", required=True, help="folder to write the model to")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"harmon {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
