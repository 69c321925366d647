"""``hf-normsoftmax``: command line tools for hf_normsoftmax runs.

Subcommands::

    hf-normsoftmax card RUN_DIR [--output PATH] [--repo-id NS/NAME] [--model-name NAME]
        Render the model card of a Trainer output dir, offline, into RUN_DIR/README.md (or --output).

    hf-normsoftmax push RUN_DIR REPO_ID [--private] [--token-env NAME] [--message TEXT] [--no-processor]
        Push the run's model (safetensors, config + remote code, tokenizer/processor, card, plots) in one commit.
        The token is read from the environment variable NAME (default: HF_TOKEN, else the saved login) and
        never printed.

    hf-normsoftmax plot RUN_DIR
        Draw the run's stability plot(s) with hf_normsoftmax.training.plots.plot_run_dir.

    hf-normsoftmax export RUN_DIR OUT_DIR [--overwrite]
        Fold sigmaReparam and beta into the weights and save the stock transformers model (loads with
        AutoModelFor*.from_pretrained(OUT_DIR) without hf_normsoftmax); refuses NormSoftmax flags, which
        cannot be folded.

``hf-normsoftmax SUBCOMMAND --help`` documents each one. Exit status: 0 on success, 2 on bad usage or bad
input, 1 when a push fails.

Start-up cost: the console script (``hf_normsoftmax_cli.py`` beside the package) loads this file without the
package's ``__init__``, which imports torch and transformers. So this module imports only the standard library at
the top, and each ``_cmd_*`` handler imports what it needs (the package with it) when it runs: ``--help`` and usage
errors stay light (tests/test_cli.py). New subcommands follow the same rule.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-normsoftmax",
        description="Model cards, Hub pushes and stability plots for hf_normsoftmax training runs.",
        epilog="Run 'hf-normsoftmax SUBCOMMAND --help' for the options of a subcommand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    card = sub.add_parser(
        "card", help="render the model card of a run dir (offline)",
        description="Render README.md for a Trainer output dir from its config, trainer_state.json, *_results.json, "
                    "run_config.json and stability*.png, without network access.")
    card.add_argument("run_dir", metavar="RUN_DIR", help="Trainer output dir (or a dir with checkpoint-N/)")
    card.add_argument("--output", "-o", metavar="PATH",
                      help="file (or directory) to write; default RUN_DIR/README.md")
    card.add_argument("--repo-id", metavar="NS/NAME", help="Hub repo the card is for (used in the load snippets)")
    card.add_argument("--model-name", metavar="NAME", help="model name in the title and model-index")

    push = sub.add_parser(
        "push", help="push a run dir to the Hub",
        description="Upload the run's model as safetensors, its config with the variant flags and auto_map, the "
                    "remote code, the tokenizer/processor, the model card and the stability plots, in one commit. "
                    "The endpoint is huggingface_hub's (HF_ENDPOINT).")
    push.add_argument("run_dir", metavar="RUN_DIR", help="Trainer output dir (or a dir with checkpoint-N/)")
    push.add_argument("repo_id", metavar="REPO_ID", help="target repo, 'namespace/name' (created if missing)")
    push.add_argument("--private", action="store_true",
                      help="create the repo private (refuses to push into an existing public repo)")
    push.add_argument("--token-env", metavar="NAME",
                      help="environment variable holding the access token (default: HF_TOKEN, else the token "
                           "saved by `hf auth login`); the token is never printed")
    push.add_argument("--message", "-m", metavar="TEXT", help="commit message")
    push.add_argument("--model-name", metavar="NAME", help="model name in the card")
    push.add_argument("--no-processor", action="store_true",
                      help="allow pushing without tokenizer/processor files")

    plot = sub.add_parser(
        "plot", help="draw the stability plot(s) of a run dir",
        description="Call hf_normsoftmax.training.plots.plot_run_dir(RUN_DIR), which writes the stability plot "
                    "image(s) into the run dir.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="Trainer output dir")

    export = sub.add_parser(
        "export", help="export a run's model as a stock transformers checkpoint",
        description="Fold sigmaReparam (W_hat = s / sigma * W) and the inverse temperature beta into the weights "
                    "and save the stock transformers model (stock config, safetensors, no code) with the "
                    "tokenizer/processor files: it loads with AutoModelFor*.from_pretrained(OUT_DIR) without "
                    "hf_normsoftmax. NormSoftmax in attention or in the loss cannot be folded and is refused.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="model folder or Trainer output dir (or a dir with "
                                                           "checkpoint-N/)")
    export.add_argument("output_dir", metavar="OUT_DIR", help="directory to write (must be new or empty)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    return parser


def _cmd_card(args) -> int:
    from .hub.card import write_card

    path = write_card(args.run_dir, args.output, repo_id=args.repo_id, model_name=args.model_name)
    print(f"wrote {path}")
    return 0


def _cmd_push(args) -> int:
    from .hub.push import HubPushError, push_run_dir

    if args.token_env is not None:
        if not args.token_env.replace("_", "").isalnum():
            print(f"hf-normsoftmax push: --token-env {args.token_env!r} is not an environment variable name",
                  file=sys.stderr)
            return 2
        token = os.environ.get(args.token_env)
        if not token:
            print(f"hf-normsoftmax push: environment variable {args.token_env} is not set or empty; it must hold "
                  "a Hub access token with write access", file=sys.stderr)
            return 2
    else:
        from huggingface_hub import get_token

        token = None  # huggingface_hub's own resolution: HF_TOKEN, then the saved login
        if not get_token():
            print("hf-normsoftmax push: no Hub token: set HF_TOKEN, log in with `hf auth login`, or pass "
                  "--token-env NAME", file=sys.stderr)
            return 2
    try:
        info = push_run_dir(args.run_dir, args.repo_id, private=args.private, token=token,
                            commit_message=args.message, model_name=args.model_name,
                            require_processor=not args.no_processor)
    except HubPushError as exc:
        print(f"hf-normsoftmax push: {exc}", file=sys.stderr)
        return 1
    print(f"pushed {args.run_dir} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _cmd_plot(args) -> int:
    try:
        from .training.plots import plot_run_dir
    except ImportError as exc:
        print("hf-normsoftmax plot: the plotting code (hf_normsoftmax.training.plots.plot_run_dir) is not "
              f"available in this installation: {exc}", file=sys.stderr)
        return 2
    result = plot_run_dir(args.run_dir)
    if result is not None:
        items = result if isinstance(result, (list, tuple)) else [result]
        for item in items:
            print(f"wrote {item}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_run_dir

    path = export_run_dir(args.run_dir, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``hf-normsoftmax`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"card": _cmd_card, "push": _cmd_push, "plot": _cmd_plot, "export": _cmd_export}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"hf-normsoftmax {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
