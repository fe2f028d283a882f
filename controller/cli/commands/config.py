"""`maiactl config get-contexts|current-context|use-context|set-context|delete-context|view`.

Edits the config file (see `controller.cli.config`); talks to no controller.
"""
from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from controller.cli.client import CliError, Exit
from controller.cli.config import ConfigFile, ContextEntry, check_address, check_token, config_path
from controller.cli.context import Context
from controller.cli.tables import render_table

_SETTINGS = [f.name for f in fields(ContextEntry)]
_SECRET = ("token",)
_FILES = ("token_file", "ca", "cert", "key")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", help="contexts in the config file ($MAIA_CONFIG or ~/.config/maia/config.yaml)",
                       description="Manage named contexts: controller address, token and TLS files. "
                                   "Settings resolve as flag > environment > context > default.")
    verbs = p.add_subparsers(dest="config_verb", metavar="VERB", required=True)
    v = verbs.add_parser("get-contexts", parents=[common], help="list the contexts (* marks the current one)")
    v.set_defaults(handler=get_contexts, offline=True)
    v = verbs.add_parser("current-context", parents=[common], help="print the current context's name")
    v.set_defaults(handler=current_context, offline=True)
    v = verbs.add_parser("use-context", parents=[common], help="make NAME the current context")
    v.add_argument("name", metavar="NAME")
    v.set_defaults(handler=use_context, offline=True)
    v = verbs.add_parser("set-context", parents=[common],
                         help="create or change context NAME from --controller/--token/--token-file/--ca/"
                              "--cert/--key (given flags only)")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--use", action="store_true", help="also make it the current context")
    v.set_defaults(handler=set_context, offline=True)
    v = verbs.add_parser("delete-context", parents=[common], help="remove context NAME")
    v.add_argument("name", metavar="NAME")
    v.set_defaults(handler=delete_context, offline=True)
    v = verbs.add_parser("view", parents=[common], help="print the config file (tokens redacted)")
    v.set_defaults(handler=view, offline=True)


def _redacted(entry: ContextEntry) -> dict[str, str]:
    return {k: ("REDACTED" if k in _SECRET else v) for k, v in entry.to_mapping().items()}


def get_contexts(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    rows = [["*" if name == config.current_context else "", name, e.controller, "yes" if e.token or e.token_file else "no",
             e.ca] for name, e in sorted(config.contexts.items())]
    ctx.emit(lambda: {"current_context": config.current_context,
                      "contexts": {n: _redacted(e) for n, e in config.contexts.items()}},
             lambda: render_table(["current", "name", "controller", "token", "ca"], rows,
                                  empty=f"No contexts in {config.path}."),
             names=lambda: sorted(config.contexts), is_table=True)
    return 0


def current_context(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    if not config.current_context:
        raise CliError(f"no current context set in {config.path} (maiactl config use-context NAME)",
                       Exit.NOT_FOUND)
    ctx.out(config.current_context)
    return 0


def use_context(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    config.entry(args.name)  # must exist
    config.current_context = args.name
    config.save()
    ctx.out(f"Switched to context \"{args.name}\".")
    return 0


def set_context(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    given = {k: getattr(args, k, None) for k in _SETTINGS if getattr(args, k, None) is not None}
    # Checked as every later command checks them: a context stored with a bad address or token
    # made each command that used it fail, the file saved as if all was well.
    if "controller" in given:
        check_address(given["controller"], "--controller")
    if "token" in given:
        check_token(given["token"], "--token")
    for key in _FILES:  # stored absolute: the file is read from wherever maiactl runs later
        if key in given:
            given[key] = str(Path(given[key]).expanduser().resolve())
    # A context holds one token: the one given now replaces the other kind (a token kept beside a
    # new --token-file won, and the file was never read: UNAUTHENTICATED with the stale token).
    if "token" in given:
        given.setdefault("token_file", None)
    elif "token_file" in given:
        given["token"] = None
    existed = args.name in config.contexts
    config.contexts[args.name] = replace(config.contexts.get(args.name, ContextEntry()), **given)
    if args.use or not config.current_context:
        config.current_context = args.name
    config.save()
    ctx.out(f"Context \"{args.name}\" {'modified' if existed else 'created'} in {config.path}.")
    return 0


def delete_context(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    config.entry(args.name)
    del config.contexts[args.name]
    if config.current_context == args.name:
        config.current_context = None
    config.save()
    ctx.out(f"Deleted context {args.name} from {config.path}.")
    return 0


def view(args: argparse.Namespace, ctx: Context) -> int:
    config = ConfigFile.load(config_path())
    doc = {"current_context": config.current_context,
           "contexts": {n: _redacted(e) for n, e in config.contexts.items()}}
    if ctx.output == "json":
        ctx.emit_json(doc)
    else:
        ctx.output = "yaml"
        ctx.emit_json(doc)
    return 0
