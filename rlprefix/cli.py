"""The `rlprefix` command: run a config, or generate / eval / compress / export / inspect a saved prefix.

Each subcommand imports what it uses inside its function, unlike every other module here, so that `rlprefix --help`,
a usage error or `rlprefix info` answer without loading the recipe, the rewards or the serving stack (fastapi,
uvicorn); the rlprefix package itself (torch, transformers) is imported either way, and with it the settings classes
the parser reads its defaults from (imported at the top).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from pathlib import Path

from rlprefix.config import EXPORT_FORMATS, ModelSection, PPOSection, RunConfig, reference
from rlprefix.messages import WarningLines, error_line
from rlprefix.models.loading import DEFAULT_MODEL
from rlprefix.prefixes.lowrank import UNRECORDED_DTYPE, CompressConfig, anchor_mode
from rlprefix.settings import (ConfigError, ServeSettings, check_of, check_value, choices_of, default_of, help_of,
                               type_hints)

EPILOG = """examples:
  rlprefix run configs/quickstart.yaml
  rlprefix run configs/sentiment.yaml ppo.steps=50 output_dir=runs/s50
  rlprefix sweep configs/quickstart.yaml --lengths 5 10 20 50 --steps 20
  rlprefix generate --prefix runs/quickstart/prefix_compressed --prompt "Write a one-sentence review of a motel."
  rlprefix eval --prefix runs/quickstart/prefix_ppo --prompts examples/data/review_prompts_heldout.jsonl --reward sentiment
  rlprefix compress runs/quickstart/prefix_ppo --out runs/c8 --rank 8
  rlprefix export runs/quickstart/prefix_ppo --format peft --out runs/peft
  rlprefix info runs/quickstart/prefix_compressed
  rlprefix serve --prefixes runs/served --port 8000
"""


class _RunHelp(argparse.RawDescriptionHelpFormatter):
    """`rlprefix run --help` ends with every config section and key, from the settings' own metadata."""

    def format_help(self) -> str:
        return super().format_help() + "\nconfig keys (key: default  # help [allowed]):\n" + reference() + "\n"


def _model_for(prefix_dir: str, explicit: str | None) -> str:
    from rlprefix.prefixes.artifacts import read_manifest

    if explicit:
        return explicit
    manifest = read_manifest(prefix_dir)
    return (manifest.get("provenance", {}).get("model") or manifest.get("model", {}).get("name_or_path")
            or DEFAULT_MODEL)


def _options(pairs: list[str]) -> dict:
    from rlprefix.config import parse_value

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ValueError(f"option {p!r} must look like key=value")
        k, _, v = p.partition("=")
        out[k] = parse_value(v)
    return out


def cmd_run(args) -> int:
    from rlprefix.config import load_config
    from rlprefix.recipe import run

    cfg = load_config(args.config, args.overrides)
    run(cfg, overwrite=args.overwrite)
    return 0


def cmd_sweep(args) -> int:
    from rlprefix.config import load_config
    from rlprefix.sweep import check_lengths, sweep_lengths

    lengths = check_lengths(args.lengths, "--lengths")  # before the config and the model are loaded
    cfg = load_config(args.config, args.overrides)
    result = sweep_lengths(cfg, lengths, steps=args.steps, out_dir=args.out)
    print()
    print(result.table_md())
    print(f"wrote {result.out_dir / 'sweep.md'}, sweep.json and sweep.png")
    print(f"chosen length: {result.chosen_length}  (run it: rlprefix run "
          f"{' '.join([args.config, *args.overrides])} prefix.length={result.chosen_length})")
    return 0


def cmd_generate(args) -> int:
    from rlprefix.decoding.engine import generate
    from rlprefix.prefixes.artifacts import load_prefix
    from rlprefix.models.loading import load_model

    model_name = _model_for(args.prefix, args.model) if args.prefix else (args.model or DEFAULT_MODEL)
    model, tok = load_model(model_name, args.dtype, args.device)
    prefix = load_prefix(args.prefix, model) if args.prefix else None
    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    texts = generate(model, tok, prompts, prefix, seed=args.seed, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, do_sample=not args.greedy, top_p=args.top_p)
    for p, t in zip(prompts, texts):
        print(json.dumps({"prompt": p, "completion": t}, ensure_ascii=False) if args.json else f">>> {p}\n{t}\n")
    return 0


def cmd_eval(args) -> int:
    from rewards import build_reward

    from rlprefix.train.evaluate import evaluate_reward
    from rlprefix.prefixes.artifacts import load_prefix
    from rlprefix.models.loading import load_model
    from rlprefix.preflight import check_dataset

    check_dataset(args.prompts, "--prompts", [["prompt"]])  # before the model: as `rlprefix run` checks its prompts
    model, tok = load_model(_model_for(args.prefix, args.model), args.dtype, args.device)
    prefix = load_prefix(args.prefix, model)
    reward = build_reward({"name": args.reward, **_options(args.reward_option)},
                          {"model": model, "tokenizer": tok, "device": args.device})
    kw = dict(seed=args.seed, max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples,
              on_error=args.on_reward_error, penalty=args.reward_penalty)
    base = evaluate_reward(model, tok, None, args.prompts, reward, **kw)
    with_prefix = evaluate_reward(model, tok, prefix, args.prompts, reward, **kw)
    report = {"base": base.as_dict(), "prefix": with_prefix.as_dict(), "gain": with_prefix.mean - base.mean}
    print(json.dumps(report, indent=2))
    return 0


def cmd_compress(args) -> int:
    from rlprefix.train.compress import compress_and_measure
    from rlprefix.prefixes.artifacts import load_prefix
    from rlprefix.files import check_artifact_target
    from rlprefix.models.loading import load_model
    from rlprefix.preflight import check_dataset

    if args.max_kl is not None and not args.prompts:  # before the work, not after it
        raise ValueError("--max-kl needs --prompts to measure KL on")
    check_artifact_target(args.out, args.force)
    check_dataset(args.prompts, "--prompts", [["prompt"]])

    model, tok = load_model(_model_for(args.prefix, args.model), args.dtype, args.device)
    prefix = load_prefix(args.prefix, model)
    comp, report = compress_and_measure(model, tok, prefix, args.prompts, rank=args.rank, energy=args.energy,
                                        max_kl=args.max_kl, scope=args.scope, anchor=anchor_mode(not args.no_anchor),
                                        dtype=args.dtype_store)
    meta = dict(getattr(prefix, "manifest", {}).get("provenance", {}))
    comp.save(args.out, {**meta, "compressed_from": str(args.prefix), "fidelity": report}, overwrite=args.force)
    print(json.dumps({k: v for k, v in report.items() if k != "relative_error_per_layer"}, indent=2))
    return 0


def cmd_export(args) -> int:
    from rlprefix.prefixes.artifacts import load_prefix
    from rlprefix.files import check_artifact_target
    from rlprefix.models.loading import load_model
    from rlprefix.prefixes.peft import export_peft

    check_artifact_target(args.out, args.force)
    model, _ = load_model(_model_for(args.prefix, args.model), args.dtype, args.device)
    prefix = load_prefix(args.prefix, model)
    if args.format == "peft":
        path = export_peft(prefix, model, args.out, overwrite=args.force)
    else:
        prefix.save(args.out, getattr(prefix, "manifest", {}).get("provenance", {}), overwrite=args.force)
        path = Path(args.out)
    print(f"wrote {args.format} export to {path}")
    return 0


def cmd_info(args) -> int:
    from rlprefix.prefixes.artifacts import read_manifest

    manifest = read_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    m = manifest["model"]
    print(f"{args.dir}: rlprefix prefix, format v{manifest['format_version']} "
          f"(rlprefix {manifest.get('rlprefix_version', '?')})")
    print(f"  kind {manifest['kind']}, length {manifest['length']}, dtype {manifest['dtype']}")
    print(f"  model {m['model_type']}: {m['num_layers']} layers x {m['num_kv_heads']} kv heads x head_dim {m['head_dim']}"
          f" (fingerprint {m['fingerprint']})")
    cfg = manifest.get("config", {})
    if cfg.get("kind") == "dynamic":
        print(f"  input-conditioned: a bank of {cfg.get('bank_size')} prefixes mixed per prompt by a router "
              f"(no PEFT export)")
    if "ranks" in cfg:
        full = m["num_layers"] * 2 * manifest["length"] * m["num_kv_heads"] * m["head_dim"]
        n = sum(r * (rows + cols) for rows, r, cols in cfg["shapes"])
        dtype = cfg.get("dtype", UNRECORDED_DTYPE)
        size = {"float32": 4}.get(dtype, 2)
        anchor = f", anchored on {len(cfg['anchor_ids'])} token ids" if cfg.get("anchor_ids") else ""
        print(f"  low rank ({cfg['scope']}{anchor}): ranks {sorted(set(cfg['ranks']))}, {n} {dtype}"
              f" parameters vs {full} float32 ({full * 4 / max(n * size, 1):.1f}x smaller)")
    prov = manifest.get("provenance", {})
    if prov:
        print("  provenance: " + json.dumps(prov)[:400])
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same one-line form as every other error."""

    def error(self, message):
        self.exit(2, f"rlprefix: error: {message} (see {self.prog} --help)\n")


def cmd_serve(args) -> int:
    from rlprefix.serve.app import serve_main

    return serve_main(args)


# ---- the parser: one function per subcommand; an option that restates a setting reads its default, choices, check
# and help from the setting's one definition (rlprefix.settings / rlprefix.config / CompressConfig, DEFAULT_MODEL) --
def _setting_type(cls, name: str):
    """An argparse `type` that converts and checks a value as setting `name` of `cls` is checked (from YAML or
    Python), so the command line allows exactly what the setting allows."""
    tp = type_hints(cls)[name]
    convert = float if float in (tp, *typing.get_args(tp)) else int

    def parse(text: str):
        try:
            return check_value("", convert(text), tp, check_of(cls, name))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return parse


def _setting_option(parser, flag: str, cls, name: str, **kw) -> None:
    """`flag` for setting `name` of `cls`: its default, its check and (unless given) its help."""
    parser.add_argument(flag, type=_setting_type(cls, name), default=default_of(cls, name),
                        help=kw.pop("help", help_of(cls, name)), **kw)


def add_model_args(sp) -> None:
    sp.add_argument("--model", help=f"base model (alias, hub id, dir or .gguf); default: the one the prefix was "
                                    f"trained on, else {DEFAULT_MODEL}")
    sp.add_argument("--dtype", default=default_of(ModelSection, "dtype"), choices=choices_of(ModelSection, "dtype"),
                    help=help_of(ModelSection, "dtype"))
    sp.add_argument("--device", default="cpu")


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="run a YAML config: warm start -> PPO -> compress -> export",
                       description="Run every enabled stage of a config into its output_dir. Rerunning resumes: "
                                   "finished stages are skipped, an interrupted one continues from its checkpoint.",
                       formatter_class=_RunHelp)
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. ppo.steps=50 reward.name=sentiment")
    r.add_argument("--overwrite", action="store_true", help="replace files in output_dir that rlprefix did not write "
                                                            "where the run writes (by default the run is refused)")
    r.set_defaults(func=cmd_run)


def add_sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="choose the prefix length: a short warm start per length, lowest validation "
                                     "perplexity wins",
                       description="For each of --lengths, run the config's warm start (prefix.length overridden, "
                                   "--steps steps) and record the best eval loss and its perplexity; write a table "
                                   "(sweep.md, sweep.json) and a plot (sweep.png), and print the chosen length: "
                                   "the lowest perplexity, the shorter one on a tie.")
    w.add_argument("config", help="YAML config file (its model, prefix and warm_start sections are used)")
    w.add_argument("overrides", nargs="*", help="key.sub=value overrides (before --lengths), e.g. warm_start.lr=3e-3")
    w.add_argument("--lengths", nargs="+", type=int, required=True, metavar="N", help="prefix lengths to try (>= 1)")
    w.add_argument("--steps", type=_positive_int, help="warm-start steps per length (default: warm_start.steps)")
    w.add_argument("--out", help="output directory (default: OUTPUT_DIR/length_sweep)")
    w.set_defaults(func=cmd_sweep)


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample completions with a saved prefix (or none)")
    g.add_argument("--prefix", help="prefix directory (manifest.json + prefix.safetensors)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per line on stdin")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    add_model_args(g)
    g.set_defaults(func=cmd_generate)


def add_eval_parser(sub) -> None:
    """Measured as the run's held-out evaluation is by default: its samples per prompt, tokens per completion,
    reward-error policy and reward."""
    e = sub.add_parser("eval", help="mean reward of a prefix vs the base model on a prompt set")
    e.add_argument("--prefix", required=True)
    e.add_argument("--prompts", required=True, help="file with a 'prompt' column (JSONL/CSV/Parquet)")
    e.add_argument("--reward", default=default_of(RunConfig, "reward")["name"],
                   help="built-in name or package.module:function")
    e.add_argument("--reward-option", action="append", help="key=value option for the reward (repeatable)")
    _setting_option(e, "--samples", PPOSection, "eval_samples_per_prompt")
    e.add_argument("--on-reward-error", choices=choices_of(PPOSection, "on_reward_error"),
                   default=default_of(PPOSection, "on_reward_error"),
                   help="a reward that raises or returns NaN: stop, or score the sample --reward-penalty")
    _setting_option(e, "--reward-penalty", PPOSection, "reward_penalty",
                    help="score of a sample whose reward failed (--on-reward-error penalty)")
    _setting_option(e, "--max-new-tokens", PPOSection, "max_new_tokens")
    e.add_argument("--seed", type=int, default=0)
    add_model_args(e)
    e.set_defaults(func=cmd_eval)


def add_compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="low-rank factorise a saved prefix")
    c.add_argument("prefix")
    c.add_argument("--out", required=True)
    c.add_argument("--scope", default=default_of(CompressConfig, "scope"), choices=choices_of(CompressConfig, "scope"),
                   help=help_of(CompressConfig, "scope"))
    c.add_argument("--store-dtype", dest="dtype_store", default=default_of(CompressConfig, "dtype"),
                   choices=choices_of(CompressConfig, "dtype"), help="dtype of the stored factors")
    c.add_argument("--no-anchor", action="store_true",
                   help="factorise the whole K/V, not only the change from the init text's K/V")
    group = c.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int)
    group.add_argument("--energy", type=float, help="keep this fraction of spectral energy")
    group.add_argument("--max-kl", type=float, help="smallest rank with mean per-token KL <= this (needs --prompts)")
    c.add_argument("--prompts", help="prompts for the fidelity report / KL budget")
    c.add_argument("--force", action="store_true", help="replace whatever is at --out (by default only a "
                                                        "previous rlprefix artifact is replaced)")
    add_model_args(c)
    c.set_defaults(func=cmd_compress)


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a prefix as an rlprefix directory or a PEFT prefix-tuning adapter")
    x.add_argument("prefix")
    x.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0])
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace whatever is at --out (by default only a "
                                                        "previous rlprefix artifact or adapter is replaced)")
    add_model_args(x)
    x.set_defaults(func=cmd_export)


def add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="describe a saved prefix (reads its manifest)")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)


def add_serve_parser(sub, model_args=add_model_args) -> None:
    s = sub.add_parser("serve", help="serve every prefix under a directory on one model (OpenAI-compatible HTTP)",
                       description="One frozen model, many prefixes: each artifact directory under --prefixes "
                                   "(full, compressed or a PEFT prefix-tuning adapter) is served under its name, "
                                   "the bare model as 'base'; select one with the request's 'model' field.")
    s.add_argument("--prefixes", required=True, help="directory whose subdirectories are prefix artifacts")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _setting_option(s, "--max-batch", ServeSettings, "max_batch")
    _setting_option(s, "--batch-wait-ms", ServeSettings, "batch_wait_ms")
    _setting_option(s, "--max-queue", ServeSettings, "max_queue", metavar="ROWS")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $RLPREFIX_API_KEY, "
                        "which keeps the key out of the process list; neither: no key, fine on 127.0.0.1 only)")
    _setting_option(s, "--drain-timeout", ServeSettings, "drain_timeout", metavar="SECONDS")
    _setting_option(s, "--max-body-bytes", ServeSettings, "max_body_bytes", metavar="BYTES")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    model_args(s)
    s.set_defaults(func=cmd_serve)


SUBCOMMANDS = (add_run_parser, add_sweep_parser, add_generate_parser, add_eval_parser, add_compress_parser,
               add_export_parser, add_info_parser, add_serve_parser)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlprefix", description="Steer a frozen causal LM with learned prefixes: "
                                "warm start, PPO, low-rank compression and export.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rlprefix {__import__('rlprefix').__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    logger, lines = logging.getLogger("rlprefix"), WarningLines()
    if args.func is not cmd_serve:
        logger.addHandler(lines)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - every error reaches the user as one line (--debug: traceback)
        if args.debug:
            raise
        print(error_line(e), file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(lines)


if __name__ == "__main__":
    sys.exit(main())
