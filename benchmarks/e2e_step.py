"""End-to-end RL step: rlx against TRL's GRPOTrainer on one CPU workload (`_e2e_task.py`).

Each run is a fresh process: 1 warm-up step + N measured steps through the real trainer
(`RLTrainer.step`), timed per phase. Prints one JSON line: median s/step, the median of each
phase, generated tokens/s, peak RSS; with `--peer trl` the same for TRL (alternating the two,
run by run) and `rlx_over_trl`; `flop_floor_s` (2 x params per generated token + 6 x params per
trained token at the matmul rate measured in the same run, in the run's dtype) and each framework's
`over_floor`; with `--background-load K` the slowdown beside K busy-looping processes.

    python benchmarks/e2e_step.py [--shape default|large] [--dtype fp32|bf16] [--peer trl]
                                  [--backend vllm|torch|both] [--placement colocated|separate|both]
                                  [--background-load 1] [--rounds 1] [--measured N]

`--backend` picks rlx's generator (`generator.backend`); `both` runs rlx once per backend in the
same invocation (results `rlx_vllm`, `rlx_torch`), so their ratios to each other and to TRL share
one machine state. `--placement separate` runs rlx on 1 trainer rank + 1 generator rank under
torchrun (`--separate-threads` OpenMP threads each, default all cores; `train.max_staleness = 1`):
results `rlx_separate` with
`step_over_max_phase` (step time over the slower of generation and training, in the same run) and
`rlx_separate_over_colocated` with `--placement both`.

A/B experiments: `--env KEY=VALUE` (rlx worker's environment), `--peer-env KEY=VALUE`,
`--rlx-set section.key=JSON` (set on rlx's resolved config), `--rlx-src DIR` (another checkout's
rlx package). The machine is shared: every run records the load average before and after, raw
per-step rows go to <workdir>/runs.jsonl, and only ratios from one invocation are comparable.

TRL runs in its own virtual environment, `benchmarks/.peer-venv` (built on first use: torch
pinned to this venv's version, trl==1.16.0), so its transformers/accelerate/datasets pins never
touch the main environment.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _e2e_task as task  # noqa: E402

PHASES = ("generate", "reward", "old_logprob", "train", "weight_sync")
PEER_VENV = HERE / ".peer-venv"
BACKENDS = ("vllm", "torch")
# rlx's generator here: torch measured faster than vllm on the default shape (`--backend both --peer
# trl`, load 0.9-1.7: 4.17 vs 4.86 s/step, generate 1.18 vs 1.73 s; two more invocations at load 1-4
# agreed) and level at --shape large (generate 19.9 vs 20.1 s, one run each at load 2.4-3.8).
DEFAULT_BACKEND = "torch"
TRL_VERSION = "1.16.0"
RESULT = "E2E_RESULT "


# ---- workers (each runs in a fresh process) ----------------------------------------------------


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rlx_config(work: Path, shape: str, dtype: str, measured: int) -> Path:
    s = task.SHAPES[shape]
    seqs, width = s["prompts"] * s["n"], task.PROMPT_TOKENS + s["new_tokens"]
    bf16 = dtype == "bf16"
    kv_gib = max(0.5, 2.0 * seqs * -(-width // 128) * 128 * s["layers"] * s["kv_heads"] * s["head_dim"] * 4 / 2**30)
    sections = {
        "job": {"name": f"e2e-{shape}-{dtype}", "output_dir": str(work / "runs"), "seed": 0},
        "model": {"path": str(work / f"model-{shape}"), "use_chat_template": False, "dtype": "float32"},
        "parallel": {"param_dtype": "bfloat16" if bf16 else "float32"},
        "data": {"train_files": [str(work / "prompts.jsonl")], "max_prompt_length": task.PROMPT_TOKENS,
                 "train_batch_size": s["prompts"], "shuffle": False},
        "generator": {"n": s["n"], "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": s["new_tokens"],
                      "dtype": "bfloat16" if bf16 else "float32", "kv_cache_space_gib": round(kv_gib, 2)},
        "sampler": {"type": "fixed"},
        "reward": {"fn": "_e2e_task:rlx_reward", "backend": "inline"},
        "algorithm": {"adv_estimator": "grpo"},
        "loss": {"type": "ppo_clip", "agg_mode": "token-mean", "kl_coef": 0.0, "ppo_epochs": 1, "mini_batch_size": 0,
                 "micro_batch_tokens": s["micro_seqs"] * width},
        "optim": {"lr": 1e-6, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": s["warmup"] + measured, "val_every": 0, "val_before_train": False},
        "checkpoint": {"enable": False},
        "logging": {"console": False, "progress_bar": False, "jsonl": False, "wandb": False},
    }  # fmt: skip
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = work / f"rlx-{shape}-{dtype}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def worker_rlx(work: Path, shape: str, dtype: str, measured: int, settings: list[str]) -> dict:
    import rlx  # noqa: F401  (first: rlx sets the OpenMP environment before torch loads)
    from rlx.config import load_config
    from rlx.trainer.rl import RLTrainer

    s = {**task.SHAPES[shape], "measured": measured}
    cfg = load_config(_rlx_config(work, shape, dtype, measured)).resolved()
    if not hasattr(cfg.generator, "min_tokens") or cfg.generator.min_tokens == 0:
        cfg.generator.min_tokens = s["new_tokens"]  # EOS suppressed: every completion is full length
    for item in settings:  # --rlx-set section.key=value, also for fields a config does not have yet
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, json.loads(value))
    backend = getattr(cfg.generator, "backend", "vllm")
    start = time.perf_counter()
    placement = None
    if getattr(cfg.generator, "placement", "colocated") == "separate":  # under torchrun: this rank's role
        from rlx.placement import split_world
        from rlx.trainer.generator_worker import run_generator

        placement = split_world(cfg.generator.num_ranks, cfg.parallel.backend)
        if placement.role == "generator":
            run_generator(cfg, placement)
            return None
    if "stages" in inspect.signature(RLTrainer).parameters:
        from rlx.trainer.rl_setup import build_stages

        trainer = RLTrainer(cfg, build_stages(cfg, placement=placement) if placement else build_stages(cfg))
    else:  # rlx before the stages were passed in
        trainer = RLTrainer(cfg)
    build = time.perf_counter() - start
    steps = []
    try:
        for step in range(1, s["warmup"] + s["measured"] + 1):
            m = trainer.step(step)
            row = {p: m.get(f"timing/{p}", 0.0) for p in PHASES}
            row.update(step=m["timing/step"], generated_tokens=m["perf/generated_tokens"], reward_mean=m["reward/mean"],
                       trainer_wait=m.get("async/trainer_wait_s", 0.0))  # fmt: skip
            steps.append(row)
    finally:
        trainer.close()
    return {"build_s": build, "steps": steps, "peak_rss_mb": _peak_rss_mb(), "backend": backend}


def worker_trl(work: Path, shape: str, dtype: str, measured: int, settings: list[str]) -> dict:
    import torch
    import trl.extras.profiling as profiling
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = {**task.SHAPES[shape], "measured": measured}
    seqs = s["prompts"] * s["n"]
    spans: dict[str, float] = {}

    def record(self, duration: float) -> None:  # TRL's profiling spans, kept instead of sent to wandb
        name = self.name.split(".", 1)[-1]  # "GRPOTrainer.transformers.generate" -> "transformers.generate"
        spans[name] = spans.get(name, 0.0) + duration

    profiling.ProfilingContext._log_metrics = record
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            spans.clear()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - self.start
            gen, rew = spans.get("transformers.generate", 0.0), spans.get("trl_reward", 0.0)
            score = spans.get("_generate_and_score_completions", gen + rew)
            steps.append({"step": total, "generate": gen, "reward": rew, "old_logprob": score - gen - rew,
                          "train": total - score, "weight_sync": 0.0, "generated_tokens": float(seqs * s["new_tokens"])})  # fmt: skip

    records = [json.loads(line) for line in open(work / "prompts.jsonl")]
    model_dir = work / f"model-{shape}"
    config = GRPOConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=s["micro_seqs"],
        gradient_accumulation_steps=seqs // s["micro_seqs"], num_generations=s["n"], num_iterations=1,
        max_completion_length=s["new_tokens"], generation_kwargs={"min_new_tokens": s["new_tokens"]},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", max_steps=s["warmup"] + s["measured"],
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=dtype == "bf16", seed=0,
        shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
    )  # fmt: skip
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=task.trl_reward, args=config, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          train_dataset=Dataset.from_list(records), callbacks=[StepTimer()])  # fmt: skip
    build = time.perf_counter() - start
    trainer.train()
    return {"build_s": build, "steps": steps, "peak_rss_mb": _peak_rss_mb()}


def worker_matmul(dtype: str) -> dict:
    """Best-of-5 rate of a 2048^3 matmul at the default thread count, GFLOP/s."""
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = min(best, (time.perf_counter() - start) / 3)
    return {"gflops": 2 * 2048**3 / best / 1e9, "threads": torch.get_num_threads()}


# ---- orchestration -----------------------------------------------------------------------------


def ensure_peer_venv() -> Path:
    """benchmarks/.peer-venv with the main venv's torch and trl==TRL_VERSION (built once)."""
    python = PEER_VENV / "bin" / "python"
    probe = [str(python), "-c", f"import trl, torch; assert trl.__version__ == '{TRL_VERSION}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    print(f"e2e_step: building {PEER_VENV} ({torch_pin}, trl=={TRL_VERSION}); once, a few minutes", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin, f"trl=={TRL_VERSION}"], check=True)
    return python


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def run_worker(python: str, kind: str, work: Path, args, env_extra: dict[str, str], settings: list[str]) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           **env_extra}  # fmt: skip
    launcher = [python]
    if any(item.startswith("generator.placement=") and "separate" in item for item in settings):
        # 1 trainer rank + 1 generator rank, each with --separate-threads OpenMP threads (torchrun's own
        # default is 1; the ranks share the cores, and idle OpenMP threads sleep: OMP_WAIT_POLICY=PASSIVE)
        launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        env = {**env, "OMP_NUM_THREADS": str(args.separate_threads)}
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", kind, "--workdir", str(work), "--shape", args.shape,
           "--dtype", args.dtype, "--measured", str(args.measured)]  # fmt: skip
    cmd += [f"--rlx-set={item}" for item in settings]
    load = uptime()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"e2e_step: the {kind} worker failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len(RESULT) :])
    with open(work / "runs.jsonl", "a") as f:  # every run's raw per-step rows, for a closer look
        f.write(json.dumps({"kind": kind, "env": env_extra, **out}) + "\n")
    out["load_before"], out["load_after"] = float(load), float(uptime())
    return out


SEPARATE = ['generator.placement="separate"', "generator.num_ranks=1", "train.max_staleness=1"]


def rlx_variants(backend: str, rlx_set: list[str], placement: str = "colocated") -> dict[str, list[str]]:
    """Result name -> --rlx-set items of each rlx run: one per generator backend asked for, and with
    `placement` separate (or both) the same on 1 trainer + 1 generator rank, max_staleness 1 (`_separate`)."""
    backends = BACKENDS if backend == "both" else (backend,)
    names = {b: "rlx" if len(backends) == 1 else f"rlx_{b}" for b in backends}
    out = {}
    for b in backends:
        if placement in ("colocated", "both"):
            out[names[b]] = [f'generator.backend="{b}"', *rlx_set]
        if placement in ("separate", "both"):
            out[f"{names[b]}_separate"] = [f'generator.backend="{b}"', *SEPARATE, *rlx_set]
    return out


def summarize(runs: list[dict], warmup: int) -> dict:
    """Medians over the measured steps of every run (warm-up steps dropped)."""
    rows = [row for run in runs for row in run["steps"][warmup:]]
    med = lambda key: round(statistics.median(r[key] for r in rows), 3)  # noqa: E731
    out = {"s_per_step": med("step"), **{p: med(p) for p in PHASES}}
    gen_tps = [r["generated_tokens"] / max(r["generate"], 1e-9) for r in rows]
    out["gen_tokens_per_s"] = round(statistics.median(gen_tps))
    out["peak_rss_mb"] = round(max(run["peak_rss_mb"] for run in runs))
    out["build_s"] = round(statistics.median(run["build_s"] for run in runs), 1)
    if "backend" in runs[0]:
        out["backend"] = runs[0]["backend"]
    if any(r.get("trainer_wait") for r in rows):  # separate ranks: overlap against the slower side
        out["trainer_wait"] = med("trainer_wait")
        out["step_over_max_phase"] = round(out["s_per_step"] / max(out["generate"] + out["reward"], out["train"]), 3)
    out["run_medians"] = [round(statistics.median(r["step"] for r in run["steps"][warmup:]), 3) for run in runs]
    out["load_avg"] = [[run["load_before"], run["load_after"]] for run in runs]
    return out


def with_background_load(k: int):
    """Start `k` busy-looping processes; returns a function that stops them."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]

    def stop() -> None:
        for p in procs:
            p.kill()
            p.wait()

    return stop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(task.SHAPES), default="default")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--peer", choices=["none", "trl"], default="none")
    p.add_argument("--backend", choices=[*BACKENDS, "both"], default=DEFAULT_BACKEND,
                   help=f"rlx's generator.backend (default {DEFAULT_BACKEND}); both: one rlx run per backend")
    p.add_argument("--placement", choices=["colocated", "separate", "both"], default="colocated",
                   help="separate: rlx on 1 trainer + 1 generator rank (torchrun), max_staleness 1; both: each")
    p.add_argument("--separate-threads", type=int, default=os.cpu_count() or 1,
                   help="OpenMP threads of each rank with --placement separate (default: all cores)")
    p.add_argument("--background-load", type=int, default=0, help="busy-looping processes beside loaded runs")
    p.add_argument("--measured", type=int, default=0, help="measured steps per run (default: the shape's, 5 or 3)")
    p.add_argument("--rounds", type=int, default=1, help="runs per framework (and per load level), alternated")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the rlx worker (A/B experiments)")
    p.add_argument("--rlx-set", action="append", default=[],
                   help="section.key=JSON set on rlx's resolved config (A/B experiments, fields not in the config yet)")
    p.add_argument("--rlx-src", default="", help="run the rlx package found here (a checkout) instead of the installed one")
    p.add_argument("--peer-env", action="append", default=[], help="KEY=VALUE for the peer's worker")
    p.add_argument("--workdir", default="", help="model, prompts and runs (default: a temporary directory)")
    p.add_argument("--worker", choices=["rlx", "trl", "matmul"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.measured = args.measured or task.SHAPES[args.shape]["measured"]
    if args.worker:
        fn = {"rlx": worker_rlx, "trl": worker_trl}.get(args.worker)
        out = fn(Path(args.workdir), args.shape, args.dtype, args.measured, args.rlx_set) if fn else worker_matmul(args.dtype)
        if out is not None:  # (a generator rank reports nothing: its trainer does)
            print(RESULT + json.dumps(out), flush=True)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rlx-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    s = task.SHAPES[args.shape]
    task.write_prompts(work / "prompts.jsonl", s["prompts"] * (s["warmup"] + args.measured))
    params = task.write_model(work / f"model-{args.shape}", args.shape)
    assert params == task.num_params(args.shape), (params, task.num_params(args.shape))
    variants = rlx_variants(args.backend, args.rlx_set, args.placement)
    frameworks = {name: sys.executable for name in variants}
    if args.peer == "trl":
        frameworks["trl"] = str(ensure_peer_venv())
    rlx_env = dict(kv.split("=", 1) for kv in args.env)
    peer_env = dict(kv.split("=", 1) for kv in args.peer_env)
    if args.rlx_src:
        rlx_env["PYTHONPATH"] = os.pathsep.join([str(Path(args.rlx_src).resolve()), str(HERE)])

    result: dict = {"bench": "e2e_step", "shape": args.shape, "dtype": args.dtype, "params": params,
                    "load_avg_start": float(uptime())}  # fmt: skip
    matmul = run_worker(sys.executable, "matmul", work, args, {}, [])
    result["matmul_gflops"] = round(matmul["gflops"], 1)
    loads = [0, args.background_load] if args.background_load else [0]
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        order = list(frameworks) if r % 2 == 0 else list(reversed(frameworks))
        for name in order:
            for k in loads:
                stop = with_background_load(k) if k else None
                try:
                    kind = "trl" if name == "trl" else "rlx"
                    out = run_worker(frameworks[name], kind, work, args, rlx_env if kind == "rlx" else peer_env,
                                     variants.get(name, []))  # fmt: skip
                finally:
                    if stop:
                        stop()
                runs.setdefault((name, k), []).append(out)
                print(f"e2e_step: {name} load={k} round {r}: {statistics.median(x['step'] for x in out['steps'][s['warmup']:]):.2f} s/step",
                      file=sys.stderr, flush=True)  # fmt: skip

    floor = task.flop_floor(args.shape, matmul["gflops"] * 1e9)
    for name in frameworks:
        summary = summarize(runs[(name, 0)], s["warmup"])
        summary["over_floor"] = round(summary["s_per_step"] / floor, 2)
        if args.background_load:
            loaded = summarize(runs[(name, args.background_load)], s["warmup"])
            summary["loaded"] = loaded
            summary["load_slowdown"] = round(loaded["s_per_step"] / summary["s_per_step"], 2)
        result[name] = summary
    result["flop_floor_s"] = round(floor, 2)
    for name in variants:
        if name.endswith("_separate") and name.removesuffix("_separate") in result:
            result[f"{name}_over_colocated"] = round(result[name]["s_per_step"] /
                                                     result[name.removesuffix("_separate")]["s_per_step"], 3)  # fmt: skip
    if "trl" in frameworks:
        for name in variants:
            result[f"{name}_over_trl"] = round(result[name]["s_per_step"] / result["trl"]["s_per_step"], 3)
    result["load_avg_end"] = float(uptime())
    if args.placement != "colocated":
        result["separate_threads_per_rank"] = args.separate_threads
    if rlx_env or args.rlx_set or peer_env:
        result["rlx_env"], result["rlx_set"], result["peer_env"] = rlx_env, args.rlx_set, peer_env
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
