"""The `mllm` command line: data synth / convert, train, eval, generate, export.

Heavy imports (deepspeed, open_clip) happen inside the subcommand that needs them, so `mllm --help`
is instant. Errors a user can fix (config, paths, data) print one clear line and exit with code 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path

EXAMPLES = """examples:
  mllm data synth --out data/demo                      # shapes world: shards, LLaVA JSON, tokenizer
  mllm data convert --json llava.json --image-root images --out shards/llava   # LLaVA JSON -> tar shards
  mllm train configs/recipes/demo.yaml run.output_dir=runs/demo stages.2.steps=50
  torchrun --nproc_per_node 2 -m mllm.train.cli train configs/recipes/demo.yaml
  mllm train configs/recipes/llava15_7b.yaml --dry-run  # resolve + validate, build a tiny stand-in
  mllm eval --model runs/demo/model --data 'data/demo/wds/heldout-vqa-*.tar'
  mllm generate --model runs/demo/model --image img.png --prompt "What color is the circle?"
  mllm export runs/demo exports/demo --push-to-hub me/demo-vlm --private
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm", description="Train, evaluate and export vision-language models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the synthetic shapes world and train its tokenizer")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=20000, help="training images (each: 1 caption + 1 VQA sample)")
    synth.add_argument("--n-heldout", type=int, default=1000, help="held-out images, never seen in training")
    synth.add_argument("--shard-size", type=int, default=2000)
    synth.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary of the trained tokenizer")
    convert = data.add_parser("convert", help="LLaVA JSON + images -> webdataset tar shards with a manifest "
                                              "(deterministic; a rerun finishes an interrupted conversion)")
    convert.add_argument("--json", required=True, help="LLaVA-style JSON list of conversations")
    convert.add_argument("--image-root", default=None, help="folder the entries' image paths are relative to "
                                                            "(default: the JSON's folder)")
    convert.add_argument("--out", required=True, help="output folder for PREFIX-NNNNNN.tar and manifest.json")
    convert.add_argument("--shard-size", type=int, default=1000, help="input entries per shard")
    convert.add_argument("--prefix", default=None, help="shard name prefix (default: the JSON file's stem)")
    convert.add_argument("--no-verify", action="store_true", help="do not decode every image to check it")

    train = sub.add_parser("train", help="run a staged recipe (YAML) with key=value overrides")
    train.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/demo.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.1.lr=2e-5 run.seed=1")
    train.add_argument("--dry-run", action="store_true", help="resolve and validate, build a tiny stand-in model")
    train.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps")
    train.add_argument("--resume", default="auto",
                       help="auto: continue from the newest complete checkpoint (default); never: refuse a run "
                            "folder that has checkpoints; or a path .../checkpoints/step-N to continue from")
    train.add_argument("--world-size", type=int, default=None,
                       help="with --dry-run: check the batch arithmetic for this many processes")

    ev = sub.add_parser("eval", help="held-out exact-match accuracy per question type (greedy, KV cache)")
    ev.add_argument("--model", required=True, help="model folder (run/model or an export)")
    ev.add_argument("--data", required=True, help="webdataset shard pattern or LLaVA JSON file of VQA samples")
    ev.add_argument("--max-samples", type=int, default=500)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=8)
    ev.add_argument("--out", default=None, help="write the report as JSON here")

    gen = sub.add_parser("generate", help="answer a prompt about an image")
    gen.add_argument("--model", required=True)
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)

    exp = sub.add_parser(
        "export", help="export to a folder that loads with torch + transformers alone (and push it to the hub)",
        description="SOURCE: a run folder, a saved model folder (run/model), a training checkpoint of any ZeRO "
                    "stage (run/stageN-x/checkpoints/step-N), a stage's final/ folder, or a LoRA adapter folder "
                    "(with --merge-lora; its base from --base or adapter_config.json).")
    exp.add_argument("source", nargs="?", help="what to export (see above)")
    exp.add_argument("out_dir", nargs="?", help="the export folder (must not exist or be empty)")
    exp.add_argument("--model", dest="source_flag", help=argparse.SUPPRESS)  # the 0.1 spelling
    exp.add_argument("--out", dest="out_flag", help=argparse.SUPPRESS)
    exp.add_argument("--format", choices=["mllm", "llava"], default="mllm",
                     help="mllm: Llava weights + flat remote code (MMA, MoE; trust_remote_code=True). "
                          "llava: plain transformers Llava (dense causal models only)")
    exp.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter (or a LoRA checkpoint) first")
    exp.add_argument("--base", default=None, help="base model of a LoRA adapter (overrides adapter_config.json)")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the saved weights")
    exp.add_argument("--max-shard-size", "--shard-size", dest="shard_size", default="2GB",
                     help="max safetensors shard size")
    exp.add_argument("--eval-report", default=None, help="eval JSON (mllm eval --out) for the model card; a run "
                                                          "folder's eval.json is used by default")
    exp.add_argument("--base-model", default=None, help="hub id of the base model, for the model card")
    exp.add_argument("--license", default=None, help="license id for the model card, e.g. apache-2.0")
    exp.add_argument("--dataset", action="append", default=None, help="hub dataset id for the card (repeatable)")
    exp.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    exp.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the export to this hub repo")
    exp.add_argument("--private", action="store_true", help="create the hub repo private")
    exp.add_argument("--revision", default=None, help="hub branch to push to (created if missing)")
    exp.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to the branch")
    return parser


def cmd_data_synth(args) -> None:
    from mllm.data.synth import generate
    from mllm.tokenizer import train_tokenizer

    summary = generate(args.out, seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout,
                       shard_size=args.shard_size)
    train_tokenizer([str(Path(args.out) / "corpus.txt")], Path(args.out) / "tokenizer", vocab_size=args.vocab_size)
    print(json.dumps(summary, indent=2))


def cmd_data_convert(args) -> None:
    from mllm.data.convert import convert_llava

    manifest = convert_llava(args.json, args.out, args.image_root, shard_size=args.shard_size, prefix=args.prefix,
                             verify_images=not args.no_verify)
    summary = {key: manifest[key] for key in ("samples", "rejected", "rejected_by_reason")}
    summary.update(shards=len(manifest["shards"]), manifest=str(Path(args.out) / "manifest.json"))
    print(json.dumps(summary, indent=2))


def cmd_train(args) -> None:
    from mllm.train.config import load_run_config

    cfg = load_run_config(args.recipe, args.overrides)
    if args.dry_run:
        from mllm.train.dry_run import dry_run

        print(dry_run(cfg, world_size=args.world_size))
        return
    from mllm.train.distributed import shutdown
    from mllm.train.trainer import run_recipe

    try:
        model_dir = run_recipe(cfg, max_steps=args.max_steps, resume=args.resume)
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    print(f"trained model: {model_dir}" if model_dir else "stopped early; run the same command to continue")


def cmd_eval(args) -> None:
    from mllm.train.evaluate import evaluate, format_report, load_for_inference, write_eval_plots

    model, processor = load_for_inference(args.model)
    report = evaluate(model, processor, args.data, max_samples=args.max_samples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        for plot in write_eval_plots(report, Path(args.out).parent):
            print(f"plot: {plot}")


def cmd_generate(args) -> None:
    from PIL import Image

    from mllm.train.evaluate import answer, load_for_inference

    if not Path(args.image).exists():
        raise FileNotFoundError(f"image not found: {args.image}")
    model, processor = load_for_inference(args.model)
    print(answer(model, processor, [Image.open(args.image).convert("RGB")], [args.prompt], args.max_new_tokens)[0])


def cmd_export(args) -> None:
    from mllm.export import export_model, verify_export
    from mllm.export.inputs import load_export_source

    source, out_dir = args.source or args.source_flag, args.out_dir or args.out_flag
    if not source or not out_dir:
        raise SystemExit("mllm export: give SOURCE and OUT_DIR, e.g. mllm export runs/demo exports/demo")
    metrics = json.loads(Path(args.eval_report).read_text()) if args.eval_report else None
    loaded = load_export_source(source, base=args.base, merge_lora=args.merge_lora)
    out = export_model(loaded, out_dir, max_shard_size=args.shard_size, metrics=metrics, format=args.format,
                       dtype=args.dtype, base_model=args.base_model, datasets=args.dataset, license=args.license)
    print(f"exported to {out}")
    if not args.no_verify:
        diff = verify_export(out, (loaded.model, loaded.processor))
        print(f"verified: reloaded with transformers, max |logit diff| {diff:.2e}")
    if args.push_to_hub:
        from mllm.export.hub import push_to_hub

        url = push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision,
                          create_pr=args.create_pr)
        print(f"pushed to {url}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "export": cmd_export}
DATA_COMMANDS = {"synth": cmd_data_synth, "convert": cmd_data_convert}


def configure_logging() -> None:
    """INFO for our loggers; open_clip's per-build chatter (it logs on the root logger) is dropped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = logging.Filter()
    quiet.filter = lambda record: "open_clip" not in record.pathname
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher prepends `--local_rank=N`; torchrun sets LOCAL_RANK instead."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    configure_logging()
    # `kill -USR1 <pid>` prints every thread's stack (the test harness does this to a hung rank).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from mllm.data.loader import DataQualityError
    from mllm.schema import ConfigError
    from mllm.train.reliability import NonFiniteLossError

    handler = DATA_COMMANDS[args.data_command] if args.command == "data" else COMMANDS[args.command]
    user_errors = (ConfigError, FileNotFoundError, DataQualityError, NonFiniteLossError)
    if args.command == "data":  # unreadable JSON, a folder holding another conversion
        user_errors += (ValueError,)
    if args.command == "export":  # an unexportable model, an occupied target, a failed push or check
        from mllm.export import ExportVerificationError
        from mllm.export.hub import HubPushError

        user_errors += (ValueError, FileExistsError, ExportVerificationError, HubPushError)
    try:
        handler(args)
    except user_errors as e:
        print(f"mllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
