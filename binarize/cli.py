"""The ``binarize`` command line. Bad input ends in one error line and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import BinarizeError

PROGRESS_HELP = ("Live progress bars (--progress) or timestamped log lines (--no-progress); unset: bars on a "
                 "terminal, log lines when the output goes to a file or a pipe.")


def live_progress(flag: Optional[bool]) -> bool:
    """--progress / --no-progress as given; unset, live bars only when stdout is a terminal. A live bar
    written to a log file shows nothing until its stage ends (tens of minutes of a CPU conversion),
    where the --no-progress lines give every step with its time."""
    return sys.stdout.isatty() if flag is None else flag

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Turn a pretrained LLM into a 1-bit / 1.58-bit model, then evaluate and serve it. "
                       "Add --debug to any command for the full traceback of an unexpected error.")


@app.command()
def convert(
    model: Optional[str] = typer.Argument(None, help="Hub id, local HF dir or .gguf file (default: SmolLM2-135M-Instruct)."),
    time_: Optional[str] = typer.Option(None, "--time", help="The time you have (20m, 1h, 8h): binarize measures "
                                        "this machine's speed for each stage on the model (seconds) and plans the "
                                        "stages to end within it; the plan is printed and kept in run.json. With "
                                        "--tokens, the end-to-end budget is fixed and the rest is planned."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="End-to-end QAT token budget: 200k, 500M, 2B or an "
                               "integer; 0 runs the initialisation alone (post-training quantization, e.g. --recipe "
                               "binary-ptq). BaI (bai_steps x bai_batch_tokens) and block-wise reconstruction "
                               "(blocks x blockwise_steps x blockwise_batch x seq_len) come on top; the log's "
                               "first lines show what each stage costs. Give --tokens or --time."),
    recipe: str = typer.Option("binaryllm-distill", "--recipe", envvar="BINARIZE_RECIPE",
                               help="Recipe name in recipes/ or a YAML path. Default binaryllm-distill, the best "
                               "measured 1-bit recipe; binaryllm is the paper's, ternary-distill the 1.58-bit one."),
    profile: str = typer.Option("auto", "--profile", envvar="BINARIZE_PROFILE",
                                help="Sizes that fit the device: auto (cpu without CUDA, else the recipe's), cpu "
                                "(sequences of 256, 1024 tokens per step, 128 calibration sequences ...: "
                                "binarize/profiles.py) or recipe (the recipe's own, the papers' settings). Flags "
                                "and --set always win."),
    data: Optional[str] = typer.Option(None, "--data", help="Training text: ptb, wikitext2:test, FILE, hf:ID[:CONFIG[:SPLIT]], "
                                       "self (the model's own samples), self+SOURCE:FRACTION, auto (default: PTB "
                                       "train if found locally, else self)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text for BaI (same forms as --data)."),
    out: Path = typer.Option(Path("runs/convert"), "--out", help="Output directory."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per training sequence (recipe: 2048)."),
    bai_steps: Optional[int] = typer.Option(None, "--bai-steps", help="BaI optimizer steps (recipe: 50)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Progressive chunks, one t each (recipe: 20)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per optimizer step."),
    bai_batch_tokens: Optional[int] = typer.Option(None, "--bai-batch-tokens", help="Tokens per BaI step (recipe: "
                                                   "4096)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per forward pass."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate, cosine to min_lr (recipe: "
                                       "1e-4)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="t per chunk: exponential | uniform | "
                                            "logarithm | degree-uniform (recipe: exponential)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order and initialisation (recipe: 0)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    switch_at: Optional[float] = typer.Option(None, "--switch-at", help="Continual switch: train in full precision, "
                                              "quantize from this step (>= 1) or fraction of the steps (< 1)."),
    retain_optimizer: Optional[bool] = typer.Option(None, "--retain-optimizer/--fresh-optimizer",
                                                    help="Keep or reset AdamW state at the switch."),
    phase_in: Optional[str] = typer.Option(None, "--phase-in", help="abrupt | linear | sigmoid quantization strength "
                                           "after the switch (length: --set phase_in_len=...)."),
    distill: Optional[float] = typer.Option(None, "--distill", help="Distil from the frozen original: loss = CE + "
                                            "ALPHA * KL (temperature: --set distill_temperature=...)."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Recompute block activations in backward: less memory, "
                                                      "more time (recipe key grad_checkpointing)."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Train a new random LLaMA of --config's shape "
                                      "(MODEL only supplies the tokenizer)."),
    config: str = typer.Option("tiny", "--config", help="Shape for --from-scratch: tiny | small | medium."),
    set_: List[str] = typer.Option([], "--set", help="Override any recipe key: --set key=value."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in OUT.partial."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    bai_only: bool = typer.Option(False, "--bai-only", help="Stop after binary-aware initialization."),
    save_init: bool = typer.Option(False, "--save-init", help="Keep the model entering end-to-end QAT (after BaI "
                                   "and block-wise) in OUT/init/ for --init-from."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start end-to-end QAT from RUN/init/ "
                                             "(a run made with --save-init; same model, calibration and "
                                             "initialisation keys) instead of running BaI and block-wise."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun / accelerate launch: shard latent weights, "
                              "gradients and AdamW moments over the processes (FSDP2) in end-to-end QAT; an "
                              "accelerate FSDP config does the same."),
    export_format: str = typer.Option("auto", "--export", help="Export the result into OUT/packed in a format of "
                                      "`binarize export` (binary, ternary2, ternary-b3, bitnet, gguf-*), none, or "
                                      "auto (binary, or ternary2 for ternary recipes)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
):
    """Convert a model by a recipe: BinaryLLM (BaI + progressive QAT, the default), BitNet b1.58 or the
    continual 16->1.58-bit switch; or train one from scratch (--from-scratch)."""
    from .profiles import sized_recipe
    from .recipe import parse_set, parse_tokens
    from .train.timeplan import parse_duration

    if tokens is None and time_ is None:
        raise BinarizeError("give --time (the time you have, e.g. --time 30m) or --tokens (the end-to-end budget)")
    n_tokens = parse_tokens(tokens, allow_zero=True) if tokens is not None else None  # argument errors first
    time_s = parse_duration(time_) if time_ is not None else None
    overrides = parse_set(set_)
    from .formats import get_format
    from .train import ConvertJob, Interrupted, convert_run

    if export_format not in ("none", "auto"):
        get_format(export_format)
    flags = {"data": data, "calib": calib, "seq_len": seq_len, "bai_steps": bai_steps, "chunks": chunks,
             "batch_tokens": batch_tokens, "bai_batch_tokens": bai_batch_tokens, "micro_batch": micro_batch,
             "lr": lr, "scheduler": scheduler, "seed": seed, "save_every": save_every, "switch_at": switch_at,
             "retain_optimizer": retain_optimizer, "phase_in": phase_in, "distill_alpha": distill,
             "grad_checkpointing": grad_checkpointing}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if data is not None and calib is None:
        overrides.setdefault("calib", data)
    used_profile, sized, rec = sized_recipe(recipe, overrides, profile, n_tokens)
    if sized and os.environ.get("RANK", "0") == "0":
        typer.echo(f"{used_profile} profile (--profile recipe keeps the recipe's sizes): "
                   + ", ".join(f"{k} {getattr(rec, k)}" for k in sized))
    if export_format == "auto":
        export_format = "ternary2" if rec.method == "ternary" else "binary"
    job = ConvertJob(model=model, tokens=n_tokens, out=out, recipe=rec, resume=resume, overwrite=overwrite,
                     bai_only=bai_only, progress=live_progress(progress), from_scratch=config if from_scratch else None,
                     export=export_format, save_init=save_init, init_from=init_from, fsdp=fsdp, time_s=time_s,
                     fixed=frozenset(overrides))
    try:
        result = convert_run(job)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            typer.echo(f"{exc}: resume with the same command and --resume" if exc.resumable else str(exc), err=True)
        raise typer.Exit(130)
    except KeyboardInterrupt:  # loading the model or the data (self-generation included): nothing written yet
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"interrupted before anything was written to {out}: run the same command again", err=True)
        raise typer.Exit(130)
    if not result.main:
        return
    record = result.record
    if record.bai:
        typer.echo(f"BaI: loss {record.bai.loss_before:.3f} -> {record.bai.loss_after:.3f}")
    if record.steps:
        typer.echo(f"QAT: {record.tokens.trained:,} tokens in {len(record.steps)} steps, "
                   f"final loss {record.steps[-1].loss:.3f}")
    typer.echo(f"wrote {result.path}")
    if record.plan is not None:
        from .train.timeplan import format_duration

        typer.echo(f"--time {format_duration(record.plan['seconds'])}: planned {format_duration(record.plan['expected_s'])}"
                   f", took {format_duration(record.plan.get('actual_s', 0.0))} before the export")
    if result.exported is not None:
        for line in result.exported.lines:
            typer.echo(line)
        typer.echo(f"exported ({export_format}): {result.exported.path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A binarize convert output directory."),
    out: Path = typer.Option(..., "--out", help="Directory for the packed model (or X.gguf for a GGUF format)."),
    fmt: str = typer.Option("binary", "--format", help="binary | ternary2 | ternary-b3 | bitnet (transformers' "
                            "stock BitNet layout, for bitnet-b158 recipes) | gguf-tq2 | gguf-tq1 | gguf-q1 "
                            "(llama.cpp; --out X.gguf for a single file)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Safetensors shard size (packed, "
                                                 "bitnet; default 2GB)."),
    cpu_cache: Optional[str] = typer.Option(None, "--cpu-cache", help="Default CPU unpack cache of a packed format: "
                                            "none | bf16 | fp32 (default bf16)."),
    outer_dtype: Optional[str] = typer.Option(None, "--outer-dtype", help="Embeddings, lm_head and other full-"
                                              "precision matrices of a packed or bitnet format: bf16 | fp16 | fp32 "
                                              "| int8 (packed only; default bf16; norms stay fp32)."),
    gguf_outer: Optional[str] = typer.Option(None, "--gguf-outer", help="GGUF embeddings and lm_head: f16 | q8_0 "
                                             "(default f16)."),
    gguf_fallback: Optional[str] = typer.Option(None, "--gguf-fallback", help="GGUF type for linears whose rows fit "
                                                "no TQ/Q1 block (exact): q4_0 | q8_0 (default q4_0)."),
):
    """Export a converted model: packed safetensors (1, 2 or 1.6 bits per weight plus scales),
    transformers' BitNet layout or a GGUF for llama.cpp."""
    from .formats import export_run

    options = {"max_shard_size": max_shard_size, "cpu_cache": cpu_cache, "outer_dtype": outer_dtype,
               "gguf_outer": gguf_outer, "gguf_fallback": gguf_fallback}
    done = export_run(run_dir, out, fmt, overwrite=overwrite, **{k: v for k, v in options.items() if v is not None})
    for line in done.lines:
        typer.echo(line)
    typer.echo(f"wrote {done.path}")


@app.command()
def chat(
    model: Optional[str] = typer.Argument(None, help="Exported dir, convert run dir, hub id, local dir, .gguf (default model)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One-shot: print the reply and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    cpu_cache: Optional[str] = typer.Option(None, "--cpu-cache", help="Packed layers on CPU: none | bf16 | fp32 "
                                            "(default: the export's, bf16 unless chosen)."),
):
    """Streaming chat with the tokenizer's chat template (greedy unless --temperature > 0)."""
    from .chat import ChatSession

    if max_new_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
        raise BinarizeError("--max-new-tokens must be positive, --temperature >= 0 and --top-p in (0, 1]")
    session = ChatSession.load(model, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, cpu_cache=cpu_cache)
    if prompt is not None:
        session.reply(prompt)
        return
    session.interactive()


@app.command("generate-data")
def generate_data(
    model: Optional[str] = typer.Argument(None, help="Hub id, local dir or .gguf (default: SmolLM2-135M-Instruct)."),
    tokens: str = typer.Option(..., "--tokens", help="Tokens to generate: 200k, 5M or an integer."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .jsonl.gz (records with a text field)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Longest sequence (each also ends at EOS)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences generated at once (64: twice the "
                                   "tokens/s of 16 on a CPU)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    greedy_prefix: int = typer.Option(4, "--greedy-prefix", help="Top-1 tokens after the random first token."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
):
    """Sample training text from the full-precision model itself (LLM-QAT's data-free recipe)."""
    from .calibration.selfgen import SelfGenConfig, check_disk, generate_to_file
    from .models import load_model
    from .recipe import parse_tokens

    if not out.name.endswith((".jsonl", ".jsonl.gz")):
        raise BinarizeError(f"--out must end in .jsonl or .jsonl.gz, got {out.name}")
    if out.exists() and not overwrite:
        raise BinarizeError(f"{out} exists (use --overwrite)")
    cfg = SelfGenConfig(tokens=parse_tokens(tokens), seq_len=seq_len, batch_size=batch_size, temperature=temperature,
                        top_p=top_p, greedy_prefix=greedy_prefix, seed=seed)
    cfg.check()
    check_disk(out.parent if str(out.parent) else Path("."), cfg.tokens)
    m, tok, src = load_model(model)
    live = live_progress(progress)
    from .train.run import plain_log

    meta = generate_to_file(m, tok, cfg, out, src.spec, live, log=None if live else plain_log)
    typer.echo(f"{meta['tokens']:,} tokens in {meta['sequences']} sequences, {meta['seconds']:.0f} s, "
               f"{meta['tokens_per_s']:.0f} tok/s (batch {batch_size}): {out}")


@app.command("eval")
def eval_(
    models: Optional[List[str]] = typer.Argument(None, help="Hub id, local dir, .gguf, convert run dir or packed "
                                                 "dir; several with --compare (default model if omitted)."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help="Comma list of wikitext2, c4, ptb ('' for none; "
                                           "default: wikitext2, with --quick/--full all three)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per window (default 2048)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N windows."),
    quick: bool = typer.Option(False, "--quick", help="The quick protocol the README quotes: the first 16 windows "
                               "x 1024 tokens of WikiText-2, C4 and PTB (minutes on a CPU)."),
    full: bool = typer.Option(False, "--full", help="The standard protocol: every window x 2048 tokens (C4: at "
                              "most 256) of WikiText-2, C4 and PTB."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."),
    ptq: str = typer.Option("none", "--ptq", help="none | sign | ternary: evaluate a round-to-nearest copy."),
    compare: bool = typer.Option(False, "--compare", help="Evaluate all MODELS; add the ratio to the first."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, e.g. boolq,piqa,hellaswag,winogrande,"
                                        "arc_easy,arc_challenge,openbookqa."),
    tasks_include: Optional[Path] = typer.Option(None, "--tasks-include", help="Folder of extra lm-eval task YAMLs."),
    tasks_limit: Optional[int] = typer.Option(None, "--tasks-limit", help="Examples per task (quick runs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON here."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the results table here."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
):
    """Perplexity by the GPTQ/OmniQuant protocol (and lm-eval zero-shot tasks) for one or more models;
    --quick / --full name the protocol, which is printed and recorded in the JSON."""
    from .evaluate import EvalOptions, evaluate_models, markdown_table, resolve_protocol

    specs = list(models or []) or [None]
    if len(specs) > 1 and not compare:
        raise BinarizeError("several models given: add --compare to evaluate them side by side")
    protocol = resolve_protocol(quick, full, seq_len, limit, None if datasets is None else
                                [d.strip() for d in datasets.split(",") if d.strip()])
    opts = EvalOptions(datasets=protocol["datasets"], seq_len=protocol["seq_len"],
                       limit=protocol["limit"], batch_size=batch_size, device=device, dtype=dtype, ptq=ptq,
                       tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
                       tasks_include=tasks_include, tasks_limit=tasks_limit, progress=live_progress(progress))
    opts.check()
    rows = evaluate_models(specs, opts, echo=typer.echo)
    table = markdown_table(rows, ratio=compare)
    typer.echo(table)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
    if markdown_out:
        markdown_out.write_text(table + "\n")


@app.command()
def ablate(
    plan: str = typer.Argument(..., help="Plan name in recipes/ablations/ (seed003, seed000, ...) or a plan YAML path."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results directory (default runs/ablate/PLAN)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Override the plan's token budget."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma list of run names to (re)run now."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the plan and print the commands only."),
):
    """Run a plan's recipes on the same model, data, budget and seed; write table.md and plot.png."""
    from .ablate import check_only, convert_command, load_plan, run_plan

    p = load_plan(plan, tokens)
    out = out or Path("runs/ablate") / p.name
    names = [n.strip() for n in only.split(",")] if only else None
    check_only(p, names)
    if dry_run:
        for m in p.members:
            if names is None or m.name in names:
                typer.echo(" ".join(convert_command(p, m, out / "runs" / m.name, resume=False, planned=True)))
        return
    results = run_plan(p, out, echo=typer.echo, only=names)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out / 'table.md'} and {out / 'plot.png'}")
    if any(r["status"] == "failed" for r in results):
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"binarize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Turn a pretrained LLM into a 1-bit / 1.58-bit model, then evaluate and serve it."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Bad input (BinarizeError) is one line and exit 2; any other exception (a
    dependency's error no check caught) is one line naming the command, exit 1, and its full
    traceback only with ``--debug`` (accepted anywhere on the command line) or BINARIZE_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BINARIZE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    loud = os.environ.get("RANK", "0") == "0"  # one line, not one per process of a multi-process launch
    try:
        app(args=argv, prog_name="binarize")
    except BinarizeError as exc:
        if loud:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before any work was written (loading, data)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (the last net: one line instead of a traceback)
        if debug:
            raise
        if loud:
            command = next((a for a in argv if not a.startswith("-")), "binarize")
            text = str(exc).strip().splitlines()
            print(f"error: {command} failed: {type(exc).__name__}: {text[0] if text else 'no message'} "
                  "(this is a bug or an input binarize does not check yet; add --debug for the traceback)",
                  file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
