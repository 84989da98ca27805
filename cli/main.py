"""``effml`` entry point: dispatches to the subcommands; bad input ends as one line, exit code 2."""

from __future__ import annotations

import logging
import os
import sys

from effml.errors import EffmlError

USAGE = """usage: effml <command> [args]

commands:
  train [overrides]        train a recipe: effml train recipe=magnitude_lenet seed=1
  train -m [sweeps]        a Hydra multirun grid: effml train -m recipe=magnitude_lenet seed=0,1,2
  list WHAT                what exists: recipes | models | data | compressors | hardware
  report PATH...           re-render the summary of finished runs under PATH
  reproduce TABLE          rerun a paper's table (recipes/tables/TABLE.yaml) and check it against the
                           paper: effml reproduce lth_lenet [--seeds 0,1,2] [--dry-run | --report]
  reproduce --list         the paper tables there are

`effml train --help` lists every config group and field.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # runs offline unless the user opts in
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchao (imported by transformers when installed) logs each optional C extension it cannot load
    logging.getLogger("torchao").setLevel(logging.ERROR)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "--version":
        from effml import __version__

        print(f"effml {__version__}")
        return 0
    command, rest = args[0], args[1:]
    try:
        if command == "train":
            from effml.cli.train import train

            return train(rest)
        if command == "list":
            from effml.cli.listing import list_command

            return list_command(rest)
        if command == "report":
            from effml.cli.listing import report_command

            return report_command(rest)
        if command == "reproduce":
            from effml.cli.reproduce import reproduce

            return reproduce(rest)
        raise EffmlError(f"unknown command '{command}'; choose from: train, list, report, reproduce")
    except EffmlError as e:
        print(f"{e.prefix}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside a fit (a fit's own interrupt is effml.errors.Interrupted)
        print("effml: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except SystemExit as e:  # raised inside Hydra's job; returned so main() is callable in-process
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0


if __name__ == "__main__":
    sys.exit(main())
