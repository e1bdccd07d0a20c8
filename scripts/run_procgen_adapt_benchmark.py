#!/usr/bin/env python
"""Procgen agents adapted to an unseen visual domain without rewards: a table over games.

A domain is a combination of the renderer's visual options (`default`: none, the renderer's own visuals).
For every game and seed, in <out> (one folder per pair of domains):
    <game>[-<domain>]-source-s<seed>
                               PPO (+ mixreg) trained in the source visuals (--source-visual, default the
                               renderer's own, unnamed), with PAD's inverse-dynamics head when pad is among
                               the methods (or an existing run: --source-run <game>=<run dir>); the shift
                               sweep names its sources alike, so with one --out the two share them
    <game>-target-s<seed>      the same recipe trained directly in the target visuals for as many
                               env steps: the ceiling adaptation tries to approach (or an existing run:
                               --target-run <game>=<run dir>)
    <game>-<method>-s<seed>    the source agent adapted by each method (SHOT-IM, SHOT, anchored-im,
                               BUFR, PAD offline, and PAD online: pad-online; when named, the ablations
                               pad-whole-encoder and pad-online-whole-encoder, PAD adapting the encoder's
                               dense layer too) to the target visuals
                               (`workbench adapt --target procgen:<game>:<visual>`), each with its own
                               default epochs unless --epochs
Every agent is scored on unseen levels of both domains with the same episodes and evaluation seed, and
each method's recovered fraction (adapted - source) / (ceiling - source) is given with its 95% interval.
The same fraction on the validation levels [10000, 10500) of the target visuals (agents.evaluate.split_levels;
online PAD adapting anew during those episodes) stands beside it, and the method with the best validation
fraction is named: the one a user would pick without looking at the test episodes.
Finished pieces are skipped and interrupted trainings and adaptations resumed (an adaptation from its
last finished epoch), so the script can be stopped and started again. With --jobs N the agents train
side by side, then the adaptations and evaluations run side by side, each command with cores/N threads
and its output in a .log beside its run. Writes
results.jsonl, fractions.jsonl, paired.jsonl and table.md to <out>, with setting.json (the domains,
budgets and evaluation): later calls with the same setting add their games, seeds and methods to the same
table (a run already there is reused, and checked to have run this driver's command), and a call with
another setting is refused. --across reads several such folders (one per pair of domains) and prints their
recovered fractions side by side, with the pairs on which each method wins back at least half the cost, and
on which the method chosen on validation does (folders of one pair of domains and source agents pool their
methods for that choice).

    python scripts/run_procgen_adapt_benchmark.py --games starpilot coinrun maze --total-steps 500000 --jobs 2 \\
        --source-run starpilot=runs/precision/fp32-s0 --visual monochrome --out runs/procgen-adapt
    python scripts/run_procgen_adapt_benchmark.py --games starpilot --source-visual no-backgrounds \\
        restrict-themes monochrome --visual default --out runs/procgen-adapt-plain
    python scripts/run_procgen_adapt_benchmark.py --across runs/procgen-adapt-plain runs/procgen-adapt-plain-nb
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.adapt import ADAPT_STATE, METHODS, ProcgenAdaptConfig  # noqa: E402
from agents.evaluate import evaluate_random_policy  # noqa: E402
from agents.resumable import final_evaluation, given_run, run_logged, source_run_name, train_to  # noqa: E402
from envs.procgen import DEFAULT_DOMAIN, GAMES, PROTOCOLS, domain_name, visual_domain  # noqa: E402
from workbench.logging import seed_table, write_json  # noqa: E402

# Monochrome assets: the shift that costs a trained agent (starpilot, 500k steps: 4.16 -> 3.10 test return);
# removing the backgrounds as well gave that agent back its full return (4.43), leaving nothing to adapt.
DEFAULT_VISUAL = ["monochrome"]
# PAD's variants: offline on collected transitions (pad) or online during the evaluation episodes, each with the
# encoder's dense layer kept as trained (PAD's split, the default) or adapted too (the ablation, and this
# driver's `pad` and `pad-online` before the ninth session); each one's `workbench adapt` flags and settings
PAD_VARIANTS = {"pad": ([], {"pad_online": False, "pad_keep_fc": True}),
                "pad-online": (["--online"], {"pad_online": True, "pad_keep_fc": True}),
                "pad-whole-encoder": (["--no-pad-keep-fc"], {"pad_online": False, "pad_keep_fc": False}),
                "pad-online-whole-encoder": (["--online", "--no-pad-keep-fc"], {"pad_online": True,
                                                                                "pad_keep_fc": False})}
BENCH_METHODS = tuple(dict.fromkeys((*METHODS, *PAD_VARIANTS)))
DEFAULT_METHODS = (*METHODS, "pad-online")   # the whole-encoder variants are ablations, run when named
# the variants that adapt while they play: their figure on any levels is a new run
ONLINE_METHODS = tuple(method for method, (_, settings) in PAD_VARIANTS.items() if settings["pad_online"])
# The games whose agents beat the uniform random policy within a CPU's budget (docs/RESULTS.md, easy, 100 test
# episodes): starpilot 4.06 at 500k (random 1.72); coinrun 4.80 at 500k (bf16) and 5.90 at 303k in monochrome
# (random 3.20; fp32 agents in its own visuals walked left and scored 0 at 140k, and seed 0 came unstuck to 5.80
# at 303k); maze 5.40 at 200k (random 4.10). Bigfish and fruitbot were still at a random agent's return at
# 410-430k steps.
DEFAULT_GAMES = ["starpilot", "coinrun", "maze"]


def recipe_args(config: dict, seed: int) -> list[str]:
    """train_procgen.py flags that repeat a run's recipe (game, protocol, envs, network, mixreg, precision)."""
    agent = config.get("agent_resolved") or config["agent"]
    return ["--env", config["env"], "--algo", config["algo"], "--protocol", config["protocol"], "--seed", str(seed),
            "--precision", config["precision"], "--num-envs", str(agent["num_envs"]), "--num-steps",
            str(agent["num_steps"]), "--backbone", agent["backbone"], "--lr", str(agent["learning_rate"]),
            "--mixreg" if agent.get("mixreg") else "--no-mixreg", "--mix-alpha", str(agent["mix_alpha"]),
            "--reward-norm-gamma", str(agent["reward_norm_gamma"])]


def visual_flags(visual: list[str]) -> list[str]:
    return ["--visual", *visual] if visual else []


def source_args(game: str, seed: int, args) -> list[str]:
    """The source agent's flags; with PAD among the methods it trains the inverse-dynamics head as well, and
    every method then adapts that same agent."""
    return [*recipe_flags(game, seed, args), *visual_flags(args.source_visual)]


def recipe_flags(game: str, seed: int, args) -> list[str]:
    aux = ["--aux", "inverse-dynamics"] if set(PAD_VARIANTS) & set(args.methods) else []
    return ["--env", game, "--seed", str(seed), "--precision", args.precision, *aux, *args.extra]


def target_args(game: str, seed: int, args) -> list[str]:
    """The source agent's recipe in the target visuals: a given run's resolved config, or the same flags
    as the source agent trained here (so both can train side by side)."""
    given = args.given[game]
    recipe = recipe_args(json.loads((given / "config.json").read_text()), seed) if given else \
        recipe_flags(game, seed, args)
    return [*recipe, *visual_flags(args.visual)]


def agent_trainings(out: Path, game: str, seed: int, args) -> list[tuple[Path, list[str]]]:
    """(run directory, train_procgen.py flags) of the agents this game and seed still need."""
    source = [] if args.given[game] else [(source_run(out, game, seed, args), source_args(game, seed, args))]
    target = [] if args.ceiling[game] else [(out / f"{game}-target-s{seed}", target_args(game, seed, args))]
    for run, _ in target:   # a source's name carries its domain; the target's does not
        check_trained_visual(run, args.visual)
    return source + target


def source_run(out: Path, game: str, seed: int, args) -> Path:
    return args.given[game] or out / source_run_name(game, args.source_visual, seed)


def target_run(out: Path, game: str, seed: int, args) -> Path:
    return args.ceiling[game] or out / f"{game}-target-s{seed}"


def target_spec(game: str, args) -> str:
    """`workbench adapt --target` for the game in the target visuals (procgen:<game> for the default ones)."""
    return f"procgen:{game}:{'+'.join(args.visual)}".rstrip(":")


def adapted_method(method: str) -> str:
    """The `workbench adapt --method` of a benchmark method (PAD's variants are pad)."""
    return "pad" if method in PAD_VARIANTS else method


def adapt_command(out: Path, game: str, method: str, seed: int, args, split: str = "test") -> list[str]:
    """The `workbench adapt` command line of one adaptation run, with this driver's settings; with split "val"
    the same run scored on the validation levels instead, in the run's validation/ folder (online PAD's
    validation figure, which only playing the validation episodes can give)."""
    run = out / f"{game}-{method}-s{seed}"
    paired, run = (args.paired_steps, run) if split == "test" else (0, run / "validation")
    return [sys.executable, "-m", "workbench.cli", "adapt", "--source", str(source_run(out, game, seed, args)),
            "--target", target_spec(game, args),
            "--method", adapted_method(method), *PAD_VARIANTS.get(method, ([], {}))[0],
            "--frames", str(args.frames), *(["--epochs", str(args.epochs)] if args.epochs else []),
            "--eval-episodes", str(args.episodes), "--eval-split", split, "--paired-steps", str(paired),
            "--seed", str(seed), "--out", str(run), "--no-progress"]


def adaptation_settings(out: Path, game: str, method: str, seed: int, args) -> dict:
    """What an adaptation run's config.json must hold for this driver to reuse it."""
    wanted = {"source": str(Path(source_run(out, game, seed, args)).resolve()),
              "target": target_spec(game, args), "frames": args.frames,
              "eval_episodes": args.episodes, "paired_steps": args.paired_steps, "seed": seed,
              "method": adapted_method(method), **PAD_VARIANTS.get(method, ([], {"pad_online": False}))[1]}
    return {**wanted, "epochs": args.epochs} if args.epochs else wanted


# what runs made before a setting existed did: PAD adapted the whole encoder until --pad-keep-fc came
BEFORE_THE_SETTING = {"pad_keep_fc": False}


def check_reusable(run: Path, wanted: dict) -> None:
    """A finished adaptation run in --out is reused only if it ran this driver's command: one that adapted
    another source, to other visuals or with other settings stops the driver in one line."""
    config = json.loads((run / "config.json").read_text())
    config["source"] = str(Path(config["source"]).resolve())
    config["target"] = config["target"].rstrip(":")
    absent = {**{k: getattr(ProcgenAdaptConfig, k, None) for k in wanted}, **BEFORE_THE_SETTING}
    recorded = {k: config.get(k, absent[k]) for k in wanted}   # absent: runs older than the setting
    differ = [f"{k} {recorded[k]!r} (this driver: {v!r})" for k, v in wanted.items() if recorded[k] != v]
    if differ:
        raise SystemExit(f"error: {run} was adapted with other settings ({'; '.join(differ)}): give another "
                         "--out, or remove that run to adapt again")


def check_trained_visual(run: Path, visual: list[str]) -> None:
    """An agent this driver trained earlier into --out is resumed only in the visuals it is meant for."""
    config_path = run / "config.json"
    if config_path.exists():
        trained_in = visual_domain(json.loads(config_path.read_text()).get("visual") or [])
        if trained_in != visual:
            raise SystemExit(f"error: {run} was trained in the {domain_name(trained_in)} visuals, not the "
                             f"{domain_name(visual)} ones this driver needs: give another --out")


def adapted_metrics(out: Path, game: str, method: str, seed: int, args) -> dict:
    """An adaptation run's metrics.json, running the adaptation first when it has none."""
    run = out / f"{game}-{method}-s{seed}"
    if not (run / "metrics.json").exists():
        run.mkdir(parents=True, exist_ok=True)
        # an interrupted run goes on after its last finished epoch; one stopped before any starts afresh,
        # clearing what it had written (its curves would mix with the new ones)
        again = ["--resume"] if (run / ADAPT_STATE).exists() else ["--overwrite"]
        run_logged(adapt_command(out, game, method, seed, args) + again, args.threads, run / "adapt.log")
    return json.loads((run / "metrics.json").read_text())


def validation_name(args) -> str:
    """The cached validation evaluation of an agent in the target visuals (named by them: one source agent
    serves several targets)."""
    return f"evaluation_{domain_name(args.visual)}_val_{args.episodes}.json"


def validation_return(run: Path, args) -> dict:
    """An agent's return on the validation levels in the target visuals: the levels a method is chosen on."""
    return final_evaluation(run, args.episodes, args.visual, name=validation_name(args), threads=args.threads,
                            split="val")


def adapted_validation(out: Path, game: str, method: str, seed: int, args) -> dict:
    """An adapted agent's validation return in the target visuals: its checkpoint played there, or for online
    PAD (whose network changes during every episode) the method itself, adapting from the source agent during
    the validation episodes (`workbench adapt --online --eval-split val`, in the run's validation/ folder)."""
    run = out / f"{game}-{method}-s{seed}"
    if method not in ONLINE_METHODS:
        return validation_return(run, args)
    if not (run / "validation" / "metrics.json").exists():
        run_logged(adapt_command(out, game, method, seed, args, split="val") + ["--overwrite"], args.threads,
                   run / "validation.log")
    return json.loads((run / "validation" / "metrics.json").read_text())["adapted_agent"]["target"]


def target_return(run: Path, args) -> dict:
    """Test return (mean_return, stderr_return) of the agent trained in the target visuals, in them (as the
    adapter evaluates)."""
    return final_evaluation(run, args.episodes, args.visual, name=f"evaluation_target_{args.episodes}.json",
                            threads=args.threads)


def random_policy_returns(out: Path, game: str, seed: int, args) -> tuple[float, float]:
    """The uniform random policy's mean test return in the source and the target visuals, on the agents'
    evaluation levels and mode: the floor that says whether an agent learned anything."""
    config = json.loads((source_run(out, game, seed, args) / "config.json").read_text())
    mode = PROTOCOLS[config["protocol"]].distribution_mode
    return tuple(evaluate_random_policy(game, args.episodes, distribution_mode=mode, visual=visual,
                                        policy_seed=seed)["mean_return"]
                 for visual in (args.source_visual, args.visual))


def run_all(jobs: int, tasks: list) -> list:
    """Call every task (a function of no arguments), `jobs` at a time; the results in task order. The first
    failure is raised once the tasks already running have ended."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(task) for task in tasks]
        return [future.result() for future in futures]


PAIRED_COLUMNS = {"tv_from_source_policy": "TV from the source policy",
                  "js_from_source_policy": "JS from the source policy (nats)", "argmax_agreement": "argmax agreement",
                  "policy_entropy": "entropy (nats)"}


def paired_rows(game: str, seed: int, label: str, m: dict, who: str) -> list[dict]:
    """The policy on the target renderings of states the source policy visited (ProcgenAdapter.paired_policies)."""
    paired = m.get("paired_states", {}).get(who)
    return [{"agent": f"{game}: {label}", "seed": seed, "column": name, "value": paired[key]}
            for key, name in PAIRED_COLUMNS.items()] if paired else []


COLUMNS = ("source agent, source", "source agent, target", *(f"{m}, target" for m in BENCH_METHODS),
           *(f"{m}, source" for m in BENCH_METHODS), "trained in target, target",
           "random policy, source", "random policy, target")


def recovered_fraction(adapted: dict, source: dict, ceiling: dict) -> dict:
    """f = (A - S) / (C - S) of the target-domain returns of the adapted agent A, the source agent S and the
    agent trained in the target visuals C, with a 95% interval by the delta method from the three
    evaluations' standard errors (independent episodes):
        Var f ~ (Var A + (f - 1)^2 Var S + f^2 Var C) / (C - S)^2.
    None where C <= S: the shift cost nothing there is to win back."""
    gap = ceiling["mean_return"] - source["mean_return"]
    if gap <= 0:
        return {"fraction": None, "low": None, "high": None}
    f = (adapted["mean_return"] - source["mean_return"]) / gap
    var = lambda r: (r.get("stderr_return") or 0.0) ** 2  # noqa: E731
    half = 1.96 * math.sqrt(var(adapted) + (f - 1) ** 2 * var(source) + f ** 2 * var(ceiling)) / gap
    return {"fraction": f, "low": f - half, "high": f + half}


def fraction_summary(cell: list[dict]) -> tuple[float, float, float, int] | None:
    """(mean f, 95% low, 95% high, seeds) of one game and method's fractions: one seed, f with its
    delta-method interval; several, the mean of the seeds' f with a t interval over them. None where no seed
    had a gap to the ceiling."""
    cell = [r for r in cell if r["fraction"] is not None]
    if not cell:
        return None
    values = [r["fraction"] for r in cell]
    if len(values) == 1:
        return values[0], cell[0]["low"], cell[0]["high"], 1
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.mean(values), statistics.mean(values) - half, statistics.mean(values) + half, len(values)


def fraction_cells(fractions: list[dict]) -> list[tuple[str, str, tuple | None]]:
    """(game, method, fraction_summary) per game and method, in the order they first appear."""
    return [(game, method, fraction_summary([r for r in fractions if (r["game"], r["method"]) == (game, method)]))
            for game, method in dict.fromkeys((r["game"], r["method"]) for r in fractions)]


def validation_mean(cell: list[dict]) -> float | None:
    """The mean recovered fraction on the validation levels over a game and method's seeds (None unless every
    seed has one)."""
    values = [r.get("val_fraction") for r in cell]
    return statistics.mean(values) if values and None not in values else None


def chosen_on_validation(fractions: list[dict]) -> list[tuple[str, str, float, tuple | None]]:
    """Per game, the method one would pick without looking at the test episodes: the highest mean recovered
    fraction on the validation levels. (game, method, that validation mean, its test fraction_summary); games
    where no method has a validation figure are left out."""
    chosen = []
    for game in dict.fromkeys(r["game"] for r in fractions):
        cells = {}
        for r in fractions:
            if r["game"] == game:
                cells.setdefault(r["method"], []).append(r)
        scored = {method: validation_mean(cell) for method, cell in cells.items()}
        scored = {method: value for method, value in scored.items() if value is not None}
        if scored:
            best = max(scored, key=scored.get)
            chosen.append((game, best, scored[best], fraction_summary(cells[best])))
    return chosen


def fraction_table(fractions: list[dict]) -> str:
    """Per game and method, the recovered fraction with its 95% interval (fraction_summary), beside the mean
    fraction on the validation levels; then, per game, the method chosen on those (chosen_on_validation)."""
    lines = ["| game | method | recovered fraction | 95% interval | seeds | validation fraction |",
             "|---|---|---|---|---|---|"]
    for game, method, summary in fraction_cells(fractions):
        cell = [r for r in fractions if (r["game"], r["method"]) == (game, method)]
        val = validation_mean(cell)
        if val is not None:
            val = f"{val:.2f}"
        elif all(r.get("val_return") is not None and r.get("val_fraction") is None for r in cell):
            # every seed evaluated there, and on every seed C <= S on validation
            val = "— (no gap to the ceiling)"
        else:
            val = ""
        if summary is None:
            lines.append(f"| {game} | {method} | — (no gap to the ceiling) | | 0 | {val} |")
            continue
        f, low, high, n = summary
        lines.append(f"| {game} | {method} | {f:.2f} | [{low:.2f}, {high:.2f}] | {n} | {val} |")
    choices = [f"- {game}: {method} (validation fraction {val:.2f}); on the test episodes "
               + (f"{summary[0]:.2f} [{summary[1]:.2f}, {summary[2]:.2f}]" if summary else "no gap to the ceiling")
               for game, method, val, summary in chosen_on_validation(fractions)]
    if choices:
        lines += ["", "The method chosen on the validation levels (highest validation fraction), and what it scores "
                  "on the test episodes:", "", *choices]
    return "\n".join(lines) + "\n"


# issue 36's bar for a method on one (game, shift) pair: at least half the cost won back, the interval above zero
HALF_WON_BACK = 0.5
CHOSEN = "chosen on validation"   # the protocol: on each pair, the method with the best validation fraction


def shifts_table(outs: list[Path]) -> str:
    """The recovered fractions of several finished benchmark folders (one per pair of domains) side by side,
    and per method the (game, shift) pairs on which it wins back at least half the cost with its 95% interval
    above zero, out of those it ran on."""
    lines = ["| game | shift | method | recovered fraction | 95% interval | seeds | half won back |",
             "|---|---|---|---|---|---|---|"]
    met_on: dict[str, dict[str, bool]] = {}   # method -> {(game, shift) pair it ran on: bar met}
    by_shift: dict[tuple, list[dict]] = {}    # folders of one pair of domains and sources, their methods together
    for out in outs:
        if not (out / SETTING_FILE).exists():
            raise SystemExit(f"error: {out} holds no benchmark ({SETTING_FILE} is missing): give a folder this "
                             "driver filled with --out")
        setting = json.loads((out / SETTING_FILE).read_text())
        shift = f"{domain_name(setting['source_visual'])} → {domain_name(setting['visual'])}"
        sources = tuple(sorted({source for source, _ in setting.get("source_and_ceiling", {}).values()}))
        by_shift.setdefault((shift, sources), []).extend(
            json.loads(line) for line in (out / "fractions.jsonl").read_text().splitlines())

    def add(game: str, shift: str, method: str, summary: tuple | None) -> None:
        met = summary is not None and summary[0] >= HALF_WON_BACK and summary[1] > 0
        met_on.setdefault(method, {})[f"{game} {shift}"] = met
        if summary is None:
            lines.append(f"| {game} | {shift} | {method} | — (no gap to the ceiling) | | 0 | |")
            return
        f, low, high, n = summary
        lines.append(f"| {game} | {shift} | {method} | {f:.3f} | [{low:.2f}, {high:.2f}] | {n} | "
                     f"{'yes' if met else 'no'} |")

    shared = [shift for shift, _ in by_shift]
    for (shift, sources), fractions in by_shift.items():
        if shared.count(shift) > 1:   # one shift from several source agents: several pairs, named by the source
            shift += f" (from {', '.join(Path(source).name for source in sources)})"
        for game, method, summary in fraction_cells(fractions):
            add(game, shift, method, summary)
        for game, method, _, summary in chosen_on_validation(fractions):
            add(game, shift, f"{CHOSEN} ({method})", summary)
    for method in [m for m in met_on if m.startswith(CHOSEN)]:   # one protocol, whichever method it chose
        met_on.setdefault(CHOSEN, {}).update(met_on.pop(method))
    won = {method: [pair for pair, met in pairs.items() if met] for method, pairs in met_on.items()}
    verdicts = [f"- {method}: {len(won[method])} of the {len(pairs)} pairs it ran on"
                + (f" ({'; '.join(won[method])})" if won[method] else "") for method, pairs in met_on.items()]
    return ("\n".join(lines) + "\n\nThe (game, shift) pairs on which each method wins back at least half the "
            "cost, its 95% interval above zero:\n\n" + "\n".join(verdicts) + "\n")


def t_quantile(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


METHODS_OWN = "each method's default"


def columns_run(rows: list[dict]) -> tuple[str, ...]:
    """The return table's columns that some run in the folder fills, in COLUMNS' order: a folder holds a few
    of the benchmark's methods, and a column of dashes for each of the others would bury them."""
    filled = {r["column"] for r in rows}
    return tuple(column for column in COLUMNS if column in filled)


def report(rows: list[dict], paired: list[dict], args, fractions: list[dict] | None = None) -> str:
    text = (f"Mean test return on unseen levels ({args.episodes} episodes per agent and domain); source visuals "
            f"{domain_name(args.source_visual)}, target visuals {domain_name(args.visual)}; agents trained for "
            f"{args.total_steps} env steps; adaptation on {args.frames} frames collected by the source policy, "
            f"{args.epochs or METHODS_OWN} epochs; mean ± sd over seeds (n)\n\n"
            + seed_table(rows, "game", columns_run(rows), "return", digits=2) + "\n")
    if fractions:
        text += ("\nThe recovered fraction (adapted - source agent) / (trained in target - source agent), target "
                 "visuals\n\n" + fraction_table(fractions))
    if paired:
        text += ("\nThe policy on the target renderings of states that the source policy visited in its own visuals, "
                 "against the source policy there (mean over the paired frames)\n\n"
                 + seed_table(paired, "agent", tuple(PAIRED_COLUMNS.values()), "value", digits=3) + "\n")
    return text


# What one --out folder's table holds fixed: the calls that share it add games, seeds and methods.
SETTING_FILE = "setting.json"
SETTING_KEYS = ("source_visual", "visual", "total_steps", "frames", "epochs", "episodes", "paired_steps")


def benchmark_setting(out: Path, args) -> dict:
    """The setting, and each game's source and ceiling runs (given, or trained into --out) by seed."""
    runs = {f"{game}-s{seed}": [str(Path(source_run(out, game, seed, args)).resolve()),
                                str(Path(target_run(out, game, seed, args)).resolve())]
            for seed in args.seeds for game in args.games}
    return {**{key: getattr(args, key) for key in SETTING_KEYS}, "source_and_ceiling": runs}


def check_setting(out: Path, setting: dict) -> dict:
    """One line, before anything runs, where --out holds a table of another setting or whose game and seed
    had another source or ceiling; returns the setting to write, with the earlier calls' runs."""
    path = out / SETTING_FILE
    if not path.exists():
        return setting
    earlier = json.loads(path.read_text())
    differ = [f"{k} {earlier.get(k)!r} (now {setting[k]!r})" for k in SETTING_KEYS if earlier.get(k) != setting[k]]
    runs = earlier.get("source_and_ceiling", {})
    differ += [f"{piece} source and ceiling {runs[piece]} (now {pair})"
               for piece, pair in setting["source_and_ceiling"].items() if runs.get(piece, pair) != pair]
    if differ:
        raise SystemExit(f"error: {out} holds a benchmark with {'; '.join(differ)}: give another --out")
    return {**setting, "source_and_ceiling": {**runs, **setting["source_and_ceiling"]}}


def write_merged(path: Path, entries: list[dict], key: tuple[str, ...], merge: bool) -> list[dict]:
    """Write `entries` to the JSON-lines `path` after the earlier entries there that this call did not
    recompute (with `merge`; without, the file is replaced); returns what was written."""
    def identity(entry: dict) -> tuple:
        return tuple(entry[k] for k in key)

    earlier = [json.loads(line) for line in path.read_text().splitlines()] if merge and path.exists() else []
    fresh = {identity(e) for e in entries}
    merged = [e for e in earlier if identity(e) not in fresh] + entries
    path.write_text("".join(json.dumps(e) + "\n" for e in merged))
    return merged


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--games", nargs="+", default=DEFAULT_GAMES, choices=GAMES)
    p.add_argument("--visual", nargs="+", default=DEFAULT_VISUAL, help="the target domain's visual options, or "
                   f"`{DEFAULT_DOMAIN}` for the renderer's own visuals (default {' '.join(DEFAULT_VISUAL)})")
    p.add_argument("--source-visual", nargs="+", default=[DEFAULT_DOMAIN], help="the visual options the source "
                   f"agents are trained in (default `{DEFAULT_DOMAIN}`: the renderer's own visuals)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=BENCH_METHODS,
                   help="pad-online: PAD adapting during the target evaluation episodes, as its eval.py runs it "
                   "(its target return is theirs); pad and pad-online keep the encoder's dense layer as trained, "
                   "pad-whole-encoder and pad-online-whole-encoder adapt it too (default: "
                   f"{' '.join(DEFAULT_METHODS)})")
    p.add_argument("--total-steps", type=int, default=500_000, help="env steps of the source and target agents")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="for agents trained here")
    p.add_argument("--source-run", action="append", default=[], metavar="GAME=RUN_DIR",
                   help="use this finished PPO run as the game's source agent (for every seed)")
    p.add_argument("--target-run", action="append", default=[], metavar="GAME=RUN_DIR",
                   help="use this finished PPO run, trained in the target visuals, as the game's ceiling")
    p.add_argument("--frames", type=int, default=ProcgenAdaptConfig.frames)
    p.add_argument("--epochs", type=int, default=None, help="adaptation epochs (default: each method's own)")
    p.add_argument("--paired-steps", type=int, default=ProcgenAdaptConfig.paired_steps,
                   help="steps of 32 envs whose states are compared in both visuals (0 skips)")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes per agent and domain")
    p.add_argument("--out", default="runs/procgen-adapt")
    p.add_argument("--jobs", type=int, default=1, help="trainings, adaptations and evaluations run side by side, "
                   "each with cores/jobs threads (2 on a 2-core machine: the source and target agents train "
                   "together)")
    p.add_argument("--across", nargs="+", type=Path, metavar="OUT", help="train nothing: print the recovered "
                   "fractions of these finished benchmark folders (one per pair of domains) side by side, and on "
                   "how many (game, shift) pairs each method wins back at least half the cost")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_procgen.py flags for the source "
                   "agents trained here (the target agents repeat their recipe)")
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    if args.across:
        print(shifts_table(args.across))
        return
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give at least 1")
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    args.visual, args.source_visual = visual_domain(args.visual), visual_domain(args.source_visual)
    if args.visual == args.source_visual:
        raise SystemExit(f"error: the source and target visuals are both {domain_name(args.visual)}: give --visual "
                         "a domain the source agent was not trained in")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pieces = [(seed, game) for seed in args.seeds for game in args.games]
    # a wrong given run fails before any training
    args.given = {game: given_run(args.source_run, game, "source", args.source_visual, args.total_steps, "ppo")
                  for game in args.games}
    args.ceiling = {game: given_run(args.target_run, game, "target", args.visual, args.total_steps, "ppo")
                    for game in args.games}
    setting = check_setting(out, benchmark_setting(out, args))
    for seed, game in pieces:   # and so does a run in --out that another setting left there
        for method in args.methods:
            run = out / f"{game}-{method}-s{seed}"
            if (run / "metrics.json").exists():
                check_reusable(run, adaptation_settings(out, game, method, seed, args))
    logged = args.jobs > 1  # side by side, each command writes to a log in the out folder
    run_all(args.jobs, [lambda run=run, flags=flags: train_to(run, args.total_steps, flags, args.threads,
                                                             out / f"{run.name}.log" if logged else None)
                        for seed, game in pieces for run, flags in agent_trainings(out, game, seed, args)])
    adapted = run_all(args.jobs, [lambda s=seed, g=game, m=method: adapted_metrics(out, g, m, s, args)
                                  for seed, game in pieces for method in args.methods])
    reference = run_all(args.jobs, [lambda s=seed, g=game: target_return(target_run(out, g, s, args), args)
                                    for seed, game in pieces])
    # the same agents on the validation levels, where a method is chosen without the test episodes
    validated = run_all(args.jobs, [lambda s=seed, g=game, m=method: adapted_validation(out, g, m, s, args)
                                    for seed, game in pieces for method in args.methods])
    val_agents = list(dict.fromkeys(run for seed, game in pieces   # a given source or ceiling serves every seed
                                    for run in (source_run(out, game, seed, args), target_run(out, game, seed, args))))
    val_of = dict(zip(val_agents, run_all(args.jobs, [lambda run=run: validation_return(run, args)
                                                      for run in val_agents])))
    rows, paired, fractions = [], [], []
    for i, (seed, game) in enumerate(pieces):
        def add(column: str, value: float) -> None:
            rows.append({"game": game, "seed": seed, "column": column, "return": value})

        for j, method in enumerate(args.methods):
            m, m_val = adapted[i * len(args.methods) + j], validated[i * len(args.methods) + j]
            if j == 0:  # the source agent's scores, from the adaptation run's evaluation
                add("source agent, source", m["source_agent"]["source"]["mean_return"])
                add("source agent, target", m["source_agent"]["target"]["mean_return"])
                paired += paired_rows(game, seed, "source agent", m, "source_agent")
            paired += paired_rows(game, seed, method, m, "adapted_agent")
            add(f"{method}, target", m["adapted_agent"]["target"]["mean_return"])
            add(f"{method}, source", m["adapted_agent"]["source"]["mean_return"])
            val = recovered_fraction(m_val, val_of[source_run(out, game, seed, args)],
                                     val_of[target_run(out, game, seed, args)])
            fractions.append({"game": game, "seed": seed, "method": method, **recovered_fraction(
                m["adapted_agent"]["target"], m["source_agent"]["target"], reference[i]),
                **{f"val_{key}": value for key, value in val.items()},
                "val_return": m_val["mean_return"]})
        add("trained in target, target", reference[i]["mean_return"])
        for domain, value in zip(("source", "target"), random_policy_returns(out, game, seed, args)):
            add(f"random policy, {domain}", value)
        print(f"seed {seed} {game}: " + ", ".join(f"{r['column']} {r['return']:.2f}" for r in rows
                                                  if (r["game"], r["seed"]) == (game, seed)), flush=True)
    merge = (out / SETTING_FILE).exists()   # earlier calls' figures join the table when they share the setting
    rows = write_merged(out / "results.jsonl", rows, ("game", "seed", "column"), merge)
    fractions = write_merged(out / "fractions.jsonl", fractions, ("game", "seed", "method"), merge)
    paired = write_merged(out / "paired.jsonl", paired, ("agent", "seed", "column"), merge)
    write_json(out / SETTING_FILE, setting)
    (out / "table.md").write_text(report(rows, paired, args, fractions))
    print(report(rows, paired, args, fractions))


if __name__ == "__main__":
    main()
