"""The `rlx` command: dispatches subcommands to the module that owns them.

User errors (`rlx.errors.UserError`) print one line `rlx: error: ...` and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help). Each function takes argv (list[str]) and
# returns an exit status (or None for 0). Modules are imported lazily so `rlx --help` and the
# config commands never import torch or vllm.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlx.trainer.rl:main", "RL post-training from a TOML config (also: python -m rlx.train)"),
    "sft": ("rlx.trainer.sft:main", "supervised fine-tuning (the RL warm start)"),
    "quickstart": ("rlx.trainer.quickstart:main", "CPU quickstart: tiny model, SFT warm start, GRPO, curves"),
    "eval": ("rlx.trainer.evaluate:main", "reward, accuracy and pass@k of a model or checkpoint on a prompt set"),
    "export": ("rlx.checkpoint:export_main", "DCP checkpoint -> HF directory (safetensors)"),
    "plot": ("rlx.plot:main", "PNG curves from one or more run directories"),
    "make-tiny": ("rlx.models.tiny:main", "write a tiny random HF-format model + tokenizer"),
    "config": ("rlx.config:cli_main", "print the resolved config (takes the same options as train)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rlx <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `rlx <command> --help` for the options of one command."]
    return "\n".join(lines)


def _resolve(target: str):
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            return None
        raise
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    from rlx.errors import PeerStopped, RunStopped, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"rlx: error: unknown command '{command}'{hint}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    func = _resolve(COMMANDS[command][0])
    if func is None:
        print(f"rlx: error: '{command}' is not implemented in this version of rlx yet "
              f"({COMMANDS[command][0]} is missing)", file=sys.stderr)
        return 2
    try:
        status = func(rest)
    except UserError as e:
        print(f"rlx: error: {e}", file=sys.stderr)
        return 2
    except PeerStopped as e:  # another rank of the job went away: its own log says why
        print(f"rlx: error: {e}", file=sys.stderr)
        return 1
    except RunStopped as e:  # SIGTERM / SIGINT: after a checkpoint, or aborted by a second signal
        print(f"rlx: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rlx: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
