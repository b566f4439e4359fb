"""``panorama train``: Stage I any-pairs pretraining and Stage II device calibration.

Reads top to bottom: setup → data → model → loop (validate, checkpoint) → save.
Checkpoints are chosen on the validation split only; the test set is not in this repo.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from panorama import checkpoint
from panorama.devices import check_torch_device
from panorama.geometry import resolve_views
from panorama.model import ModelConfig, NefNetV2
from panorama.synth import Synthesizer

from panorama.errors import CheckpointError, ConfigError

from .config import PROBE_STEPS, TrainConfig, ValConfig
from .data import LOSSES, AnyPairsSampler, load_real, simulate_example
from .evaluate import ModelMethod, Task, evaluate, load_cases
from . import splits

log = logging.getLogger(__name__)


def code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lr_at(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    frac = (step - o.warmup) / max(1, o.steps - o.warmup)
    return o.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _save_state(path: Path, opt: torch.optim.Optimizer, step: int, best: float, rng_states: list) -> None:
    """Optimizer moments as tensors, the rest as JSON metadata: no pickle anywhere."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    meta = {"step": json.dumps(step), "best": json.dumps(best), "rng": json.dumps(rng_states)}
    save_file(tensors, str(path) + ".tmp", metadata=meta)
    Path(str(path) + ".tmp").replace(path)


def _load_state(path: Path, opt: torch.optim.Optimizer) -> tuple[int, float, list]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = opt.state_dict()
    state: dict = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return json.loads(meta["step"]), json.loads(meta["best"]), json.loads(meta["rng"])


PROBE_FROM, PROBE_TO = PROBE_STEPS
MIN_VAL_RECORDS = 10  # fewer validation records than this: the checkpoint choice is warned noisy
POOL_MIN = 64  # fewer simulated patients than this are made in this process: spawning costs more


def simulate_pool(cfg: TrainConfig) -> list:
    """The simulated patients, in ``cfg.threads`` processes when there are many (each patient
    depends on its seed alone, so the pool is the same however it is made). The processes are
    spawned, so a script that calls ``run`` needs the usual ``if __name__ == "__main__":``."""
    d = cfg.data
    make = partial(simulate_example, n_random=d.sim_random_views, hidden=tuple(d.hidden), anatomy=d.sim_anatomy)
    seeds = [cfg.seed * 1_000_003 + i for i in range(d.sim_patients)]
    bar = dict(total=len(seeds), desc="simulating patients", unit="pt")
    if cfg.threads == 1 or len(seeds) < POOL_MIN:
        return [make(s) for s in tqdm(seeds, **bar)]
    with ProcessPoolExecutor(cfg.threads, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(make, seeds, chunksize=16), **bar))


def fit_steps(cfg: TrainConfig, done: int, elapsed_s: float, step_s: float, val_s: float) -> int:
    """The step count that ends the run within ``cfg.optim.minutes``: ``done`` steps taken,
    ``elapsed_s`` spent since the run started, each further step ``step_s`` and each
    validation ``val_s`` (one every ``val.every`` steps and one at the end), 3 % spare."""
    left = 0.97 * cfg.optim.minutes * 60 - elapsed_s - val_s
    more = max(0, int(left / (step_s + val_s / cfg.val.every)))
    return max(done + 1, min(cfg.optim.steps, done + more))


def check_run_folder(cfg: TrainConfig, resume: bool) -> None:
    """ConfigError unless ``cfg.out`` suits the run: a fresh run must not write over another's
    checkpoints and log; ``--resume`` needs a run there whose model is the config's."""
    out = cfg.out
    held = [n for n in ("best.safetensors", "last.safetensors", "train_state.safetensors") if (out / n).is_file()]
    if not resume:
        if held:
            raise ConfigError(f"{out} already holds a run ({', '.join(held)}): --resume continues it; to start "
                              "afresh, give the config another out or remove that folder")
        return
    if not {"last.safetensors", "train_state.safetensors"} <= set(held):
        raise ConfigError(f"--resume: no run to resume in {out} (needs last.safetensors and train_state.safetensors)")
    try:
        ran = checkpoint.read_header(out / "last.safetensors")["config"]
        wanted = (checkpoint.read_header(cfg.init)["config"] if cfg.init is not None
                  else json.loads(json.dumps(ModelConfig(**cfg.model.model_dump()).to_dict())))
    except CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    try:
        from safetensors import safe_open

        with safe_open(str(out / "train_state.safetensors"), framework="pt") as f:
            f.metadata()["step"]
    except Exception as exc:  # random bytes, a truncated header, a missing key
        raise ConfigError(f"--resume: {out / 'train_state.safetensors'} is not a readable training state "
                          f"(truncated or corrupted?): {type(exc).__name__}: {exc}") from None
    differs = {k: (ran.get(k), v) for k, v in wanted.items() if ran.get(k) != v}
    if differs:
        said = ", ".join(f"{k} {a} in the run, {b} in the config" for k, (a, b) in differs.items())
        raise ConfigError(f"--resume: the run in {out} has another model ({said}); resume it with its own config")


def run(cfg: TrainConfig, resume: bool = False) -> Path:
    # --- setup
    t_start = time.time()
    cfg = cfg.model_copy(deep=True)  # optim.minutes may fix optim.steps: the caller's config stays as given
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    try:
        check_torch_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dev = torch.device(cfg.device)
    out = cfg.out
    check_run_folder(cfg, resume)  # before any work, and before config.json is written over
    if cfg.init is not None:
        checkpoint.read_header(cfg.init)  # a file that is no checkpoint is said now, not after the data loads
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))

    # --- data
    real_train = []
    if cfg.data.real is not None:
        real_train = load_real(cfg.data.real, "train", cfg.data.hidden, cfg.data.sources or None,
                               cfg.data.val_records or None)
        log.info("real training records: %d", len(real_train))
        if not real_train:
            raise ConfigError(f"no usable training records in {cfg.data.real} (sources {cfg.data.sources or 'any'}): "
                              "a record trains when its name falls in the training split (about "
                              f"{1 - splits.VAL_FRACTION:.0%} by a hash of the name; names starting S0, s0 or ptb_ "
                              "always validate: training/splits.py) and it holds 3 or more good leads")
    sim = simulate_pool(cfg)
    d = cfg.data
    samplers = {name: AnyPairsSampler(ex, d.crop_samples, d.max_inputs, d.max_queries, cfg.seed + k,
                                      p_true=d.sim_true_angles if name == "sim" else 0.0)
                for k, (name, ex) in enumerate((("real", real_train), ("sim", sim))) if ex}
    n_sim = round(cfg.optim.batch * d.sim_weight) if "real" in samplers else cfg.optim.batch
    n_sim = n_sim if "sim" in samplers else 0
    task = Task(resolve_views(cfg.val.inputs), resolve_views(cfg.val.views))
    val_cases = []
    if cfg.data.real is not None:
        all_paths = sorted(p.with_suffix("") for p in Path(cfg.data.real).rglob("*.hea"))
        paths = splits.select(all_paths, "val", cfg.data.val_records or None)
        # the protocol's task is scored on 12-lead records; a device's own (val.inputs/val.views among
        # the leads it records) on its records, whichever standard leads they hold
        protocol = (cfg.val.inputs, cfg.val.views) == (ValConfig().inputs, ValConfig().views)
        val_cases, _ = load_cases(paths, task, progress=False, all_standard=protocol)
        val_cases_all = val_cases
        if cfg.data.sources:  # a device-calibrated model is chosen on that device's records
            val_cases = [c for c in val_cases
                         if splits.from_sources(c.record.source, cfg.data.sources)]
        log.info("validation records (%s -> %s): %d", cfg.val.inputs, cfg.val.views, len(val_cases))
        if not val_cases:
            raise ConfigError(
                f"no validation records: checkpoints could not be chosen. Of the {len(all_paths)} records in "
                f"{cfg.data.real}, {len(paths)} "
                + ("are named in data.val_records" if cfg.data.val_records else
                   f"fall in the validation split (about {splits.VAL_FRACTION:.0%}, by a hash of the record name: "
                   "training/splits.py)")
                + (f" and {len(val_cases_all)} of those hold "
                   + ("the 12 standard leads" if protocol else f"{cfg.val.inputs},{cfg.val.views}")
                   + " over at least 10 s, none flat" if paths else "")
                + (f", none from sources {cfg.data.sources}" if cfg.data.sources and val_cases_all else "")
                + "; give the folder more of the device's records of 10 s or more with those leads"
                + (", or name other ones in data.val_records" if cfg.data.val_records else
                   ", or name some in data.val_records")
                + (". A device that records fewer than the 12 leads validates on its own: set val.inputs and "
                   "val.views to leads it records" if protocol else ""))
        if len(val_cases) < MIN_VAL_RECORDS:
            log.warning("checkpoints are chosen on only %d validation records: the choice, and the validation "
                        "figure, are noisy; %d or more are better (data.val_records names them)", len(val_cases),
                        MIN_VAL_RECORDS)

    # --- model
    if cfg.init is not None:
        model, _ = checkpoint.load(cfg.init)
        log.info("initialised from %s", cfg.init)
    else:
        model = NefNetV2(ModelConfig(**cfg.model.model_dump()))
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step, best = 0, -math.inf
    state_path = out / "train_state.safetensors"
    if resume:
        last, last_meta = checkpoint.load(out / "last.safetensors")
        model.load_state_dict(last.state_dict())
        try:
            step, best, rng_states = _load_state(state_path, opt)
        except Exception as exc:  # safetensors, JSON and torch each raise their own
            raise ConfigError(f"--resume: {state_path} is not a readable training state (truncated or "
                              f"corrupted?): {type(exc).__name__}: {exc}; start afresh in another folder") from None
        log_path = out / "log.jsonl"
        budgeted = [r for r in map(json.loads, log_path.read_text().splitlines()) if "budget_min" in r] \
            if log_path.is_file() else []
        if budgeted and cfg.optim.minutes is not None:  # the step count the budget chose, not the config's
            cfg.optim.steps = budgeted[-1]["steps"]
            (out / "config.json").write_text(cfg.model_dump_json(indent=2))  # as the first run left it
        if last_meta.get("step") != step:
            raise ConfigError(f"--resume: {out} holds last.safetensors at step {last_meta.get('step')} but "
                              f"optimizer state at step {step} (interrupted while saving); start afresh")
        if (out / "best.safetensors").is_file():
            best = checkpoint.val_psnr(checkpoint.read_header(out / "best.safetensors")["meta"])
        for s, st in zip(samplers.values(), rng_states):
            s.rng.bit_generator.state = st
        log.info("resumed at step %d (best validation %.2f dB)", step, best)
    meta = {"stage": cfg.stage, "device_id": cfg.device_id, "code_revision": code_revision(),
            "training_data": {"real": str(cfg.data.real) if cfg.data.real else None, "split": "train",
                              "sources": cfg.data.sources, "val_records": cfg.data.val_records or None,
                              "hidden_leads": cfg.data.hidden,
                              "real_records": len(real_train), "sim_patients": len(sim)},
            "init": str(cfg.init) if cfg.init else None, "device": cfg.device}

    def validate(m=model) -> dict:
        m.eval()
        return evaluate(val_cases, task, ModelMethod(Synthesizer(m, device=cfg.device)), progress=False).summary

    if cfg.init is not None and val_cases:  # what the run must beat: a fine-tune can end worse than it began
        kept = last_meta.get("init_val") if resume else None
        if kept and kept.get("records") == len(val_cases):
            meta["init_val"] = kept
        else:  # a fresh run, or one resumed from before this bar was kept (or on other records)
            start = validate(checkpoint.load(cfg.init)[0].to(dev))["overall"]
            meta["init_val"] = {"psnr_db": start["psnr_db"], "r_median": start["r_median"], "records": len(val_cases)}
            log.info("starting model %s: %.2f dB on the %d validation records", cfg.init, start["psnr_db"],
                     len(val_cases))

    # --- loop
    log_file = (out / "log.jsonl").open("a")
    bar = tqdm(total=cfg.optim.steps, initial=step, desc=f"stage {cfg.stage}", unit="step")
    t0, t_probe, losses = time.time(), None, []
    loss_fn = LOSSES[cfg.optim.loss]
    while step < cfg.optim.steps:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        parts = []
        if n_sim:
            parts.append(samplers["sim"].batch(n_sim).to(dev))
        if cfg.optim.batch - n_sim > 0:
            parts.append(samplers["real"].batch(cfg.optim.batch - n_sim).to(dev))
        loss = sum(loss_fn(model(b.x, b.in_angles, b.mask, b.q_angles), b.y, b.q_mask) * len(b.x)
                   for b in parts) / cfg.optim.batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step == PROBE_FROM:
            t_probe = time.time()
        if step == PROBE_TO and cfg.optim.minutes is not None and t_probe is not None:
            step_s = (time.time() - t_probe) / (PROBE_TO - PROBE_FROM)
            t_val = time.time()
            if val_cases:
                validate()
            val_s = time.time() - t_val
            steps = fit_steps(cfg, step, time.time() - t_start, step_s, val_s)
            log.info("budget %.1f min: %.1f ms a step, %.1f s a validation -> %d steps (config: %d)",
                     cfg.optim.minutes, step_s * 1000, val_s, steps, cfg.optim.steps)
            spent = (time.time() - t_start) / 60
            if spent > cfg.optim.minutes:  # the warm-up alone took longer than the whole budget
                log.warning("the budget of %g min was spent by the speed measurement itself (%.1f min, %d steps): "
                            "the run stops at step %d, over budget", cfg.optim.minutes, spent, PROBE_TO, steps)
            log_file.write(json.dumps({"step": step, "budget_min": cfg.optim.minutes, "step_ms": step_s * 1000,
                                       "val_s": val_s, "steps": steps}) + "\n")
            cfg.optim.steps = steps
            (out / "config.json").write_text(cfg.model_dump_json(indent=2))
            bar.total = steps
        if step % cfg.val.every == 0 or step == cfg.optim.steps:
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": lr_at(step, cfg),
                   "elapsed_s": round(time.time() - t0, 1)}
            losses = []
            if val_cases:
                summary = validate()
                rec["val_psnr_db"] = summary["overall"]["psnr_db"]
                rec["val_r_median"] = summary["overall"]["r_median"]
                if rec["val_psnr_db"] > best:
                    best = rec["val_psnr_db"]
                    checkpoint.save(model, out / "best.safetensors", {**meta, "step": step, "val": summary})
            checkpoint.save(model, out / "last.safetensors", {**meta, "step": step})
            _save_state(state_path, opt, step, best, [s.rng.bit_generator.state for s in samplers.values()])
            bar.set_postfix(loss=f"{rec['loss']:.4f}", val=f"{rec.get('val_psnr_db', float('nan')):.2f}")
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
    bar.close()
    final = out / ("best.safetensors" if val_cases else "last.safetensors")
    if not final.is_file():  # every validation NaN: never a best
        raise ConfigError(f"no validation gave a finite score, so {out} holds no best checkpoint: the run diverged "
                          f"(optim.lr {cfg.optim.lr:g}?); its last step is {out / 'last.safetensors'}")
    start_db = (meta.get("init_val") or {}).get("psnr_db")
    if not val_cases:
        log.info("done: %s (no validation records: the last step)", final)
        return final
    log.info("done: %s (best validation %.2f dB on %d records%s)", final, best, len(val_cases),
             "" if start_db is None else f"; the starting model {start_db:.2f} dB")
    if start_db is not None and best <= start_db:
        log.warning("no step beat the starting model (best %.2f dB against its %.2f dB on the same records): "
                    "%s is no better than %s, and --ship refuses it; lower optim.lr, train longer or give more of "
                    "the device's records", best, start_db, final, cfg.init)
    return final
