"""What the ``fastbd`` commands share: the output folder, the default device, common flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help (none for unset values and off switches); the
    examples in the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, summary: str,
                examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows ``summary``, every default and the ``examples``
    (each a full ``fastbd …`` line; the CLI tests parse every one)."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser = sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                            formatter_class=HelpFormatter)
    parser.set_defaults(examples=examples)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_out(out: str | Path, sub_folders: tuple[str, ...] = ()) -> Path:
    """The command's output folder, checked before any work: writable, its ``sub_folders``
    (those the result writes into) usable, and emptied of the result an earlier run left there
    (so it never looks like this run's) — by rank 0 under torchrun, the others waiting for
    it."""
    from fastbd.distributed import barrier, world
    from fastbd.storage import check_sub_folder, check_writable_dir, remove_result

    if world().main:
        remove_result(check_writable_dir(out))
        for name in sub_folders:
            check_sub_folder(out, Path(out) / name)
    barrier()
    return Path(out)


CLASS_NAME_PRESETS = ("imagenet",)
TEMPLATE_PRESETS = ("openai",)


def class_names_arg(value: str) -> list[str]:
    """``--class-names``: ``imagenet`` (open_clip's bundled ImageNet-1k names, in label
    order), a file with one name per line, or comma-separated names."""
    from fastbd.data.readers import read_lines

    if value == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if Path(value).is_file():
        return read_lines(value)
    return [name.strip() for name in value.split(",")]


def templates_arg(value: str) -> list[str]:
    """``--templates``: ``openai`` (open_clip's bundled 80 OpenAI ImageNet prompts, as
    ``{}`` templates) or a file with one template per line; each must hold a ``{}``."""
    from fastbd.data.readers import read_lines

    if value == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    else:
        templates = read_lines(value)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a {{}} for the class name: {bad[0]!r}")
    return templates


def duplicates_policy(args: argparse.Namespace) -> str:
    """The readers' duplicate policy: ``refuse`` with ``--refuse-duplicates``, else ``warn``."""
    return "refuse" if getattr(args, "refuse_duplicates", False) else "warn"


def add_duplicates_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refuse-duplicates", action="store_true",
                        help="stop when the file list names an image twice (or the CSV repeats "
                             "an image-caption pair); by default a warning says how many")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default_device(),
                        help="torch device to compute on")


def add_image_source_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """``--file-list`` / ``--image-folder``: the command's images (``what`` they are for)."""
    parser.add_argument("--file-list", help=f"'<path> <label>' per line: {what}")
    parser.add_argument("--image-folder", help=f"ImageFolder root (one folder per class): {what}")


def read_labelled_images(file_list: str | None, image_folder: str | None,
                         duplicates: str = "warn") -> tuple[list[Path], list[int], list[str]]:
    """Paths, labels and file-list lines of ``--file-list`` or ``--image-folder`` (exactly one
    given); an ImageFolder's lines are ``<path> <label>``."""
    from fastbd.data.readers import read_file_list, read_image_folder

    if bool(file_list) == bool(image_folder):
        raise ValueError("give exactly one of --file-list and --image-folder")
    if file_list:
        listing = read_file_list(file_list, duplicates=duplicates)
        return listing.paths, listing.labels, listing.lines
    paths, labels, _ = read_image_folder(image_folder)
    return paths, labels, [f"{p} {label}" for p, label in zip(paths, labels, strict=True)]


def add_pair_csv_flags(parser: argparse.ArgumentParser, flag: str, required: bool,
                       what: str) -> None:
    """A CSV of image–caption pairs (``flag``, required when ``required``) and its column
    flags: ``--image-key``, ``--caption-key``, ``--separator``."""
    parser.add_argument(flag, required=required, help=what)
    parser.add_argument("--image-key", default="image", help=f"{flag}: the image column")
    parser.add_argument("--caption-key", default="caption", help=f"{flag}: the caption column")
    parser.add_argument("--separator", default=",", help=f"{flag}: the column separator")


def add_shards_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """``--shards`` (WebDataset ``.tar`` files: a brace pattern or a folder) and
    ``--caption-member``."""
    parser.add_argument("--shards", help=f"WebDataset shards instead of a CSV ('data/"
                        f"{{000..009}}.tar' or a folder of .tar files): {what}")
    parser.add_argument("--caption-member", default="txt",
                        help="--shards: the member extension holding each caption")


def load_clip_pairs(args: argparse.Namespace, csv_path: str | None, model, cache: Path | None,
                    captions_required: bool = True):
    """The pairs of ``csv_path`` or of ``--shards`` (exactly one given) for ``model``, read
    at ``--image-size`` (default the model's) through the memory-mapped ``cache``; without
    ``captions_required`` a CSV may lack the caption column (``tokens`` None)."""
    from fastbd.clipdefense.loading import load_pairs, load_shard_pairs
    from fastbd.models.clip import tokenizer_name

    shards = getattr(args, "shards", None)
    if bool(csv_path) == bool(shards):
        raise ValueError("give exactly one of a CSV of pairs and --shards")
    common = dict(tokenizer_name=tokenizer_name(args.arch), image_size=args.image_size,
                  skip_bad=args.skip_bad, cache=cache, verbose=not args.quiet)
    if shards:
        return load_shard_pairs(shards, model, caption_key=args.caption_member, **common)
    return load_pairs(csv_path, model, image_key=args.image_key, caption_key=args.caption_key,
                      separator=args.separator, duplicates=duplicates_policy(args),
                      captions_required=captions_required, **common)


def remove_pairs_cache(cache: Path) -> None:
    """Delete what ``load_clip_pairs`` cached (a CSV's or the shards' bank)."""
    from fastbd.data.bank import remove_cache
    from fastbd.data.shards import remove_shard_cache

    remove_cache(cache)
    remove_shard_cache(cache)


def grouped_references(values: list[str] | None, targets: list[int], flag: str,
                       attack: str = "the attack") -> list[list[str]]:
    """``flag``'s files per target: plain paths for one target; ``TARGET:PATH`` for several
    (every target at least one, no other target)."""
    if not values:
        raise ValueError(f"{attack} on your files needs {flag}: one or more images of target "
                         f"class {targets[0]}'s object"
                         + ("; with several targets, as TARGET:PATH" if len(targets) > 1
                            else ""))
    if len(targets) == 1:
        return [list(values)]
    grouped: dict[int, list[str]] = {t: [] for t in targets}
    for value in values:
        head, sep, path = value.partition(":")
        if not sep or not head.strip().isdigit() or int(head) not in grouped:
            raise ValueError(f"{flag} {value!r}: with several targets each is TARGET:PATH, "
                             f"TARGET one of {targets}")
        grouped[int(head)].append(path)
    missing = [t for t, paths in grouped.items() if not paths]
    if missing:
        raise ValueError(f"targets {targets}: no {flag} for target(s) {missing} (give "
                         "TARGET:PATH for each)")
    return [grouped[t] for t in targets]
