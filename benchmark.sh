#!/usr/bin/env bash
# The README's results table, reproducible: a grid of (script, dataset, variant, seed) runs, then one collection
# step that turns their metrics.json files into the table (mean +- std over seeds) and a plot of score by round.
#
#   ./benchmark.sh                      # the default grid, seeds 1 2 3, jobs in parallel here, then --collect
#   ./benchmark.sh --jobs 4 --only maze2d --seeds "1 2"   # --only: the rows that match a regular expression
#   ./benchmark.sh -- --num-iterations 3000          # flags after -- go to every run
#   ./benchmark.sh --slurm "--partition gpu --gres gpu:1 --time 01:00:00"   # one array task per job, then collect
#   ./benchmark.sh --collect            # collect again the runs named in benchmark/logs (each run prints its folder)
#   ./benchmark.sh --out benchmark-cpu ...   # logs, table and plot there; the block <!-- benchmark-cpu:start --> of README.md or docs/*.md
#   ./benchmark.sh --speed              # one Hopper run here (d4rl-medium, made if missing), then where its time went
#   ./benchmark.sh --micro              # the hot paths alone on synthetic Hopper-size data, then a profile
#     (env: SMALL=1 tiny sizes, COMPILE=0 no torch.compile, PARTS=act,eval,train,attention,padding,profile, BATCH, REPS,
#      LENGTHS=an .npz with a dataset's `lengths`, e.g. the cache gac_continuous.py writes beside it)
#   ./benchmark.sh --dry-run            # print the runs of the grid
#   ./benchmark.sh --fit <dataset-id> -- runs/<a> runs/<b>   # how well gac_continuous.py runs' offline models
#     fit trajectories of that dataset, all with one and the same inference (env: FIT_TRAJECTORIES, default 256)
#   ./benchmark.sh --deadline 540 ...   # stop every run 540 s after the start (SIGTERM; metrics.json is kept)
#
# Variants, side by side on the same data and budget: gac (exploitation by ascent on the plan, dynamic target
# y+), prior (plans drawn from the prior, no inference: the latent ablation), fixed-target (exploration towards a
# fixed y* = 1.0, the reference expert: the exploration ablation) and offline-data (the same rounds and updates,
# but every batch from the offline data: what the online trajectories add over more training). One job per
# (dataset, seed): an offline run (exp-name bench-offline, --online-rounds 0 --save-model), then the four variants
# in parallel, each starting from that run's offline.pt (--init-from): they differ only in inference and online
# fine-tuning, and the offline training is paid once instead of four times.
set -euo pipefail
cd "$(dirname "$0")"

OUT=benchmark
SEEDS="1 2 3"
JOBS=""
ONLY=""
DEADLINE=""
MODE=local
STAMP=$(date +%Y%m%d-%H%M%S)-$$  # names this invocation's files: a later or a parallel grid adds, never overwrites
SLURM_ARGS=""
EXTRA=()
while (($#)); do
  case "$1" in
    --jobs) JOBS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --slurm) MODE=slurm; SLURM_ARGS=$2; shift 2 ;;
    --collect) MODE=collect; shift ;;
    --speed) MODE=speed; shift ;;
    --micro) MODE=micro; shift ;;
    --fit) MODE=fit; FIT_DATA=$2; shift 2 ;;
    --dry-run) MODE=dry; shift ;;
    --out) OUT=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "benchmark.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
fail() {
  echo "benchmark.sh: error: $*" >&2
  exit 2
}
[[ -z "$JOBS" || "$JOBS" =~ ^[1-9][0-9]*$ ]] || fail "--jobs takes a positive integer, got '$JOBS'"
[[ -z "$DEADLINE" || "$DEADLINE" =~ ^[1-9][0-9]*$ ]] || fail "--deadline takes seconds (an integer), got '$DEADLINE'"
[[ "$SEEDS" =~ ^\ *[0-9]+(\ +[0-9]+)*\ *$ ]] || fail "--seeds takes integers separated by spaces (\"1 2 3\"), got '$SEEDS'"
if [[ $MODE == slurm && -n "$DEADLINE$JOBS" ]]; then
  fail "--deadline and --jobs act on a grid run here; under SLURM give its own options (--time) to --slurm"
fi
[[ -z "$DEADLINE" || $MODE == local ]] || fail "--deadline stops the runs of a grid run here (no --$MODE)"
if [[ $MODE == local || $MODE == slurm || $MODE == dry ]]; then
  for flag in "${EXTRA[@]}"; do  # the grid names each run: given after --, they would merge its rows
    case "$flag" in
      --seed | --seed=* | --exp-name | --exp-name=* | --init-from* | --resume*)
        fail "the grid sets ${flag%%=*} for each of its runs: leave it out of the flags after --" ;;
    esac
  done
fi
EXTRA_Q=""  # the flags after --, quoted for the command lines the jobs run
((${#EXTRA[@]})) && printf -v EXTRA_Q ' %q' "${EXTRA[@]}"
mkdir -p "$OUT/logs"
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone answers OMP_NUM_THREADS, 1 in our commands

# script | --env-id and data flags (one grid row per dataset)
GRID=(
  "gac_continuous.py|--env-id Hopper --dataset d4rl-medium"
  "gac_continuous.py|--env-id Hopper --dataset d4rl-medium-expert"
  "gac_maze2d.py|--env-id umaze"
  "gac_maze2d.py|--env-id medium"
)
declare -A VARIANTS=(
  [gac]=""
  [prior]="--exploit-steps 0 --num-candidates 1"
  [fixed-target]="--fixed-target 1.0"
  [offline-data]="--online-fraction 0.0"
)

JOBS_FILE="$OUT/jobs_$STAMP.txt"        # one line per job; each SLURM task reads its own line
PREPARE_FILE="$OUT/prepare_$STAMP.txt"  # the datasets the runs share, made once before them

write_jobs() {
  : >"$JOBS_FILE"
  : >"$PREPARE_FILE"
  for row in "${GRID[@]}"; do
    script=${row%%|*}
    data=${row#*|}
    [[ -z "$ONLY" || "$row" =~ $ONLY ]] || continue  # a regular expression: maze2d, Hopper, "umaze", "d4rl-medium$"
    if [[ "$script" == gac_maze2d.py ]]; then
      maze=$(sed -E 's/.*--env-id ([a-z]+).*/\1/' <<<"$data")
      # the runs' own flags decide the data (--dataset-steps, --training-return hold, ...): made and cached once
      echo "python -c \"import sys, gac_maze2d as g; g.load_training_data(g.tyro.cli(g.Args, args=sys.argv[1:]))\" --env-id $maze$EXTRA_Q" >>"$PREPARE_FILE"
    elif [[ "$data" =~ --env-id\ ([A-Za-z0-9]+)\ --dataset\ d4rl-([a-z-]+) ]]; then
      env=${BASH_REMATCH[1]}
      level=${BASH_REMATCH[2]}
      local id="gac-regenerated/mujoco/${env,,}/d4rl-$level-v0"
      # the node that runs it counts its own cores (a SLURM task); the dataset is the same for any number
      local make="generate --env-id $env --level $level --workers \$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
      [[ $level == medium-replay ]] && make="replay --env-id $env"  # from the SAC run's replay buffer
      echo "[ -d \"\${MINARI_DATASETS_PATH:-\$HOME/.minari/datasets}/$id/data\" ] || python datasets/make_dataset.py $make" >>"$PREPARE_FILE"
    fi
    for seed in $SEEDS; do
      local i job log
      i=$(wc -l <"$JOBS_FILE")
      # the runs' output, quoted for the command line; collect finds their folders there
      printf -v log '%q' "$OUT/logs/${STAMP}_job${i}"
      # a SIGTERM (--deadline) reaches every run; the job then waits for them to write their metrics.json
      job="trap wait TERM; python $script $data --seed $seed --exp-name bench-offline$EXTRA_Q"
      job+=" --online-rounds 0 --save-model >${log}_offline.log 2>&1"  # after the flags of --, so that they win
      job+=" && dir=\$(sed -n 's/^run folder: //p' ${log}_offline.log) && {"
      for variant in "${!VARIANTS[@]}"; do  # every variant of the table above
        # the variant's own flags after those given after --, so that they win
        job+=" python $script $data --seed $seed --exp-name bench-$variant$EXTRA_Q${VARIANTS[$variant]:+ ${VARIANTS[$variant]}}"
        job+=" --init-from \"\$dir\" >${log}_$variant.log 2>&1 &"
      done
      echo "$job for p in \$(jobs -p); do wait \$p || s=1; done; exit \${s:-0}; }" >>"$JOBS_FILE"
    done
  done
  if [[ ! -s "$JOBS_FILE" ]]; then
    rm -f "$JOBS_FILE" "$PREPARE_FILE"
    fail "--only '$ONLY' matches no row of the grid ($(printf '%s; ' "${GRID[@]}" | sed 's/; $//'))"
  fi
}

run_local() {
  local i=0 failed="$OUT/logs/${STAMP}_failed.txt" devices=() gpus
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then  # the GPUs this shell may use, not every GPU of the machine
    IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
  elif ((gpus > 0)); then
    mapfile -t devices < <(seq 0 $((gpus - 1)))
  fi
  if [[ -z "$JOBS" ]]; then  # one job (up to four runs at once) per GPU, or per two CPU cores without one
    if ((${#devices[@]})); then JOBS=${#devices[@]}; else JOBS=$((CPUS / 2 > 0 ? CPUS / 2 : 1)); fi
  fi
  echo "preparing datasets: $(wc -l <"$PREPARE_FILE") commands"
  local pids=() cmd p
  while IFS= read -r cmd; do
    bash -c "$cmd" >>"$OUT/logs/${STAMP}_prepare.log" 2>&1 &
    pids+=($!)
  done <"$PREPARE_FILE"
  for p in "${pids[@]}"; do
    wait "$p" || fail "a dataset could not be made (see $OUT/logs/${STAMP}_prepare.log)"
  done
  echo "$(wc -l <"$JOBS_FILE") jobs (an offline run, then four variants), $JOBS at a time, logs in $OUT/logs"
  declare -A on_device=()  # GPU -> the pids of the jobs started on it
  while IFS= read -r cmd; do
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
    local device=() limit=() best="" fewest="" d alive
    for d in "${devices[@]}"; do  # the GPU that runs the fewest jobs now
      alive=0
      for p in ${on_device[$d]:-}; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
      if [[ -z "$fewest" ]] || ((alive < fewest)); then best=$d fewest=$alive; fi
    done
    [[ -n "$best" ]] && device=("CUDA_VISIBLE_DEVICES=$best")
    if [[ -n "$DEADLINE" ]]; then  # SIGTERM at the deadline: the runs still write their metrics.json
      local left=$((DEADLINE - SECONDS))
      if ((left <= 0)); then
        echo "deadline reached: job $i and later not started" >&2
        echo "$i and later: not started" >>"$failed"
        break
      fi
      limit=(timeout "$left")
    fi
    (env "${device[@]}" "${limit[@]}" bash -c "$cmd" >"$OUT/logs/${STAMP}_job$i.log" 2>&1 || {
      echo "job $i ended early or failed (see $OUT/logs/${STAMP}_job${i}_*.log): $cmd" >&2
      echo "$i" >>"$failed"
    }) &
    [[ -n "$best" ]] && on_device[$best]+=" $!"
    i=$((i + 1))
  done <"$JOBS_FILE"
  wait
  [[ ! -s "$failed" ]] || FAILED_JOBS=$(wc -l <"$failed")
}

run_slurm() {
  local n out_abs
  n=$(wc -l <"$JOBS_FILE")
  [[ "$OUT" == /* ]] && out_abs=$OUT || out_abs=$PWD/$OUT
  cat >"$OUT/slurm_task_$STAMP.sh" <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=gac-benchmark
#SBATCH --output="$out_abs/logs/slurm_%A_%a.log"
cd $(printf '%q' "$PWD")
exec bash -c "\$(sed -n "\$((SLURM_ARRAY_TASK_ID + 1))p" $(printf '%q' "$out_abs/jobs_$STAMP.txt"))"
EOF
  # a failed preparation cancels the array and the collection (--kill-on-invalid-dep) instead of leaving them pending
  # shellcheck disable=SC2086
  prepare=$(sbatch --parsable --job-name=gac-prepare --output="$out_abs/logs/prepare_%j.log" $SLURM_ARGS \
    --wrap "cd $(printf '%q' "$PWD") && bash -e $(printf '%q' "$out_abs/prepare_$STAMP.txt")")
  # shellcheck disable=SC2086
  array=$(sbatch --parsable --dependency=afterok:"$prepare" --kill-on-invalid-dep=yes --array=0-$((n - 1)) \
    $SLURM_ARGS "$OUT/slurm_task_$STAMP.sh")
  # shellcheck disable=SC2086
  sbatch --parsable --dependency=afterany:"$array" --kill-on-invalid-dep=yes --job-name=gac-collect \
    --output="$out_abs/logs/collect_%j.log" $SLURM_ARGS \
    --wrap "cd $(printf '%q' "$PWD") && ./benchmark.sh --collect --out $(printf '%q' "$OUT")"
  echo "submitted $n runs as array $array; the collection runs when they have all ended"
}

collect() {
  python - "$OUT" <<'EOF'
"""Collect the metrics.json of the runs in $OUT/logs into a markdown table, the README block and a plot."""
import dataclasses
import glob
import importlib
import json
import os
import re
import shlex
import sys
from collections import defaultdict

import numpy as np

out = sys.argv[1]
# the runs of this table: those whose output is in its logs (each run prints its folder), not every run under runs/
folders = set()
for log in glob.glob(os.path.join(out, "logs", "*.log")):
    with open(log, errors="replace") as f:
        folders.update(line.removeprefix("run folder: ").strip() for line in f if line.startswith("run folder: "))
by_variant = defaultdict(list)
for folder in sorted(folders):
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        continue  # killed before it wrote any
    with open(path) as f:
        metrics = json.load(f)
    args = metrics.get("args", {})
    if args.get("exp_name") in ("bench-offline", "bench-speed") or "offline" not in metrics:
        continue  # the offline run the variants start from, --speed's run, or no evaluation yet
    if metrics.get("status", "").startswith("failed"):  # a run stopped by --deadline keeps its finished rounds
        print(f"left out: {folder}, {metrics['status']}")
        continue
    machine = metrics.get("machine", metrics.get("device", "?"))  # seeds are averaged on one kind of machine only
    key = (metrics["script"], metrics["dataset_id"], args["exp_name"].removeprefix("bench-"), machine)
    by_variant[key].append((os.path.getmtime(path), folder, metrics))

# a row averages runs made with the same flags, one per seed (the newest): runs of one name with other flags (a grid
# run again with other flags after --) get rows of their own, labelled by the flags that differ
NOT_RESULTS = {"seed", "exp_name", "init_from", "resume", "save_model", "checkpoint_every", "log_every", "track",
               "wandb_project_name", "wandb_entity", "async_envs"}  # fmt: skip
groups = {}
for (script, dataset, variant, machine), found in by_variant.items():
    common = set.intersection(*(set(m["args"]) for _, _, m in found)) - NOT_RESULTS  # flags every run records
    flag_sets = defaultdict(list)
    for entry in found:
        flag_sets[json.dumps({k: entry[2]["args"][k] for k in sorted(common)})].append(entry)
    values = {flags: json.loads(flags) for flags in flag_sets}
    differ = sorted(k for k in common if len({json.dumps(v[k]) for v in values.values()}) > 1)
    for flags, entries in flag_sets.items():
        label = variant
        if differ:
            label += " (" + ", ".join(f"--{k.replace('_', '-')} {values[flags][k]}" for k in differ) + ")"
        newest = {}
        for mtime, folder, metrics in sorted(entries, key=lambda entry: entry[0]):
            seed = metrics["args"]["seed"]
            if seed in newest:
                print(f"left out: {newest[seed][0]}, an older run of seed {seed} of {variant} with the same flags")
            newest[seed] = (folder, metrics)
        groups[(script, dataset, label, machine)] = [metrics for _, metrics in newest.values()]
if not groups:
    sys.exit(f"benchmark.sh: error: no finished run is named in {out}/logs/*.log (run ./benchmark.sh --out {out} "
             f"first; a run made by hand joins this table when its output is saved there, as {out}/logs/<name>.log)")


def changed_defaults(script, command, args, offline_only=False):
    """The flags whose value in this run is a default that has changed since (the run's command left them out):
    appended, so that the command beside a row repeats its runs whatever the defaults are now. `offline_only`: only
    the flags of offline training (an --init-from run's args also hold its own inference and online flags)."""
    module = importlib.import_module(script.removesuffix(".py"))
    pinned = []
    for field in dataclasses.fields(module.Args):
        name, flag = field.name, "--" + field.name.replace("_", "-")
        if name not in args or args[name] == field.default or name in ("resume", "init_from"):
            continue
        if offline_only and name in module.AFTER_OFFLINE_FLAGS:
            continue
        if re.search(rf"(^| )--(no-)?{flag[2:]}([ =]|$)", command):
            continue  # given in the command
        value = args[name]
        if isinstance(value, bool):
            pinned.append(flag if value else "--no-" + flag[2:])
        else:
            pinned.append(f"{flag} {'None' if value is None else shlex.quote(str(value))}")
    return "".join(" " + p for p in pinned)


def mean_std(values):
    values = np.array(values, dtype=float)
    return f"{values.mean():.1f} +- {values.std():.1f}" if len(values) else "-"


lines = [
    "| script | dataset | variant | seeds | offline score | after online rounds | posteriors: std, active dims, action gain "
    "| wall time per run | machine |",
    "|---|---|---|---|---|---|---|---|---|",
]
commands = []
rounds_by_key = {}
for (script, dataset, variant, machine), runs in sorted(groups.items()):
    seeds = sorted(run["args"]["seed"] for run in runs)
    offline = [run["offline"]["score_mean"] for run in runs]
    # wall time of a whole run: the shared offline run until its checkpoint, then this run
    wall = [run["timings_s"]["total"] + run.get("init_from", {}).get("timings_s", {}).get("total", 0.0) for run in runs]
    # a run stopped by --deadline keeps the rounds it finished: compare the seeds at the rounds all of them reached
    n_rounds = min(len(run.get("online", [])) for run in runs)
    online = [run["online"][n_rounds - 1]["score_mean"] for run in runs] if n_rounds else []
    rounds_by_key[(script, dataset, variant, machine)] = np.array(
        [[run["offline"]["score_mean"]] + [r["score_mean"] for r in run.get("online", [])[:n_rounds]] for run in runs]
    )
    planned = max(run["args"].get("online_rounds", 0) for run in runs)
    after = "-" if not online else f"{mean_std(online)} ({n_rounds} round{'s' * (n_rounds > 1)})"
    if online and n_rounds < planned:
        after = f"{mean_std(online)} ({n_rounds} of {planned} rounds)"
    posteriors = [run["local_posteriors"] for run in runs if run.get("local_posteriors")]
    posterior = "-"
    if posteriors:
        std, active = np.mean([p["std"] for p in posteriors]), np.mean([p["active_dims"] for p in posteriors])
        posterior = f"{std:.2f}, {active:.0f} of {posteriors[0]['dims']}"
        gains = [p["plan_gain_action_per_step"] for p in posteriors if "plan_gain_action_per_step" in p]
        posterior += f", {np.mean(gains):.3f} nats/step" if gains else ""
    lines.append(f"| {script} | {dataset} | {variant} | {' '.join(map(str, seeds))} | {mean_std(offline)} "
                 f"| {after} | {posterior} | {np.mean(wall):.0f} s | {machine} |")
    command = re.sub(r"--seed \d+", "--seed <seed>", runs[0].get("command", ""))
    command = re.sub(r"--init-from \S+", "--init-from <offline run>", command)
    command += changed_defaults(script, command, runs[0]["args"])
    offline_command = runs[0].get("init_from", {}).get("command")
    if offline_command:
        offline_command = re.sub(r"--seed \d+", "--seed <seed>", offline_command)
        offline_command += changed_defaults(script, offline_command, runs[0]["args"], offline_only=True)
        command = f"{offline_command}`, then `{command}"
    commands.append(f"- {script}, {dataset}, {variant}, {machine}: `{command}`")
note = ("Scores: the mean over seeds of each run's mean score, +- the standard deviation over seeds (numpy's, ddof "
        "0). Wall time per run: the offline run the four variants share (data, offline training, its evaluation), "
        "then the variant's own evaluation and online rounds; a seed's four variants ran at once, sharing a GPU or "
        "the CPU cores. "
        "Posteriors: the local posteriors' mean std after offline training and the latent dimensions whose posterior "
        "means vary across trajectories (mean over seeds). They start at std 0.08 and no dimension in use; a trained "
        "latent has std near 1 and many dimensions in use; std near 0.08 means too few visits, no dimension in use "
        "means collapse: either way the run measured behaviour cloning. Action gain: how much higher log p(actions | z) "
        "is per step with z0 from the posteriors than from the prior, on the last logged batch of offline training; "
        "near 0 the generator ignores the plan, and no inference on the plan can steer the actions (README, "
        "implementation notes).")
# how far a run's score moves from one round's evaluation to the next: a row's score after the rounds is one draw
moves, noise = defaultdict(list), defaultdict(list)
for (script, dataset, variant, machine), runs in groups.items():
    for run in runs:
        evaluations, episodes = run.get("online", []), run["args"].get("eval_episodes")
        for before, after in zip(evaluations, evaluations[1:]):
            moves[(dataset, machine)].append(abs(after["score_mean"] - before["score_mean"]))
            if episodes and "score_std" in before and "score_std" in after:  # two independent means of episodes:
                std = np.hypot(before["score_std"], after["score_std"]) / np.sqrt(episodes)  # E|a - b| = 0.80 std
                noise[(dataset, machine)].append(np.sqrt(2 / np.pi) * std)
if moves:
    several = len({key[3] for key in groups}) > 1  # the table's machines: name them
    parts = []
    for (dataset, machine), values in sorted(moves.items()):
        part = f"{dataset}{', ' + machine if several else ''} {np.mean(values):.1f} (largest {np.max(values):.1f}"
        if noise[(dataset, machine)]:
            part += f"; an evaluation's own noise alone: {np.mean(noise[(dataset, machine)]):.1f}"
        parts.append(part + ")")
    note += (" Between consecutive online rounds' evaluations a run's score moved by, on average: " + ", ".join(parts)
             + ". A row's score after the rounds is one draw of that movement: differences between rows smaller than "
             "it need more seeds.")  # fmt: skip
table = "\n".join(lines) + f"\n\n{note}\n\nCommands (each seed of the row):\n\n" + "\n".join(commands) + "\n"
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
print(table)

name = os.path.basename(os.path.normpath(out))  # --out benchmark-cpu fills the block <!-- benchmark-cpu:start -->
start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
in_repository = os.path.dirname(os.path.abspath(out)) == os.getcwd()  # not some/other/benchmark: its own table only
for document in ["README.md", *sorted(glob.glob("docs/*.md"))] if in_repository else []:  # wherever the block is
    text = open(document).read()
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        with open(document, "w") as f:
            f.write(f"{before}{start}\n{table}{end}{after}")
        print(f"{document}: results table {name} updated")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

datasets = sorted({key[1] for key in rounds_by_key})
variants = sorted({key[2] for key in rounds_by_key})  # one colour per variant in every panel
palette = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
several_machines = len({key[3] for key in rounds_by_key}) > 1
labels = {f"{key[2]}, {key[3]}" if several_machines else key[2] for key in rounds_by_key}
legend_rows = -(-len(labels) // 4)  # one legend under the panels, four entries a row
height = 3.5 + 0.25 * legend_rows
figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), height), squeeze=False)
for axis, dataset in zip(axes[0], datasets):
    for (script, d, variant, machine), scores in sorted(rounds_by_key.items()):
        if d != dataset:
            continue
        rounds = np.arange(scores.shape[1])
        label = f"{variant}, {machine}" if several_machines else variant
        color = palette(variants.index(variant) % palette.N)
        axis.plot(rounds, scores.mean(0), marker="o", label=label, color=color)
        if len(variants) <= 4:  # +- a std over seeds; the bands of more variants hide each other
            low, high = scores.mean(0) - scores.std(0), scores.mean(0) + scores.std(0)
            axis.fill_between(rounds, low, high, alpha=0.15, color=color)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    axis.set_title(dataset, fontsize=9)
    axis.set_xlabel("online round (0 = offline)")
    axis.set_ylabel("normalised score")
handles = {}
for axis in axes[0]:
    for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
        handles.setdefault(label, handle)
figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
figure.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
figure.savefig(os.path.join(out, "score_by_round.png"), dpi=120)
print(f"plot: {os.path.join(out, 'score_by_round.png')}")
EOF
}

speed() {
  local id="gac-regenerated/mujoco/hopper/d4rl-medium-v0"
  if [[ ! -d "${MINARI_DATASETS_PATH:-$HOME/.minari/datasets}/$id/data" ]]; then  # made as the grid makes it
    local make="python datasets/make_dataset.py generate --env-id Hopper --level medium --workers $CPUS"
    echo "$make"
    $make >"$OUT/logs/prepare.log" 2>&1 || { tail -n 5 "$OUT/logs/prepare.log"; exit 1; }
    echo "dataset made in $SECONDS s (not counted in the run's time below)"
  fi
  local cmd="python gac_continuous.py --env-id Hopper --dataset d4rl-medium --exp-name bench-speed$EXTRA_Q"
  local log="$OUT/logs/${STAMP}_speed.log"
  echo "$cmd"
  bash -c "$cmd" >"$log" 2>&1 || { tail -n 5 "$log"; exit 1; }
  python - "$log" <<'EOF'
import json, os, sys
folder = next(line.removeprefix("run folder: ").strip() for line in open(sys.argv[1]) if line.startswith("run folder: "))
path = os.path.join(folder, "metrics.json")  # this run's, not the newest of its name
m = json.load(open(path))
t, s = m["timings_s"], m["throughput"]
print(f"{path} on {m.get('machine', m['device'])}")
print(f"whole run {t['total']:.0f} s: " + ", ".join(f"{k} {v:.0f} s ({100 * v / t['total']:.0f} %)"
      for k, v in sorted(t.items(), key=lambda kv: -kv[1]) if k != "total"))
print(f"training: {s['train_tokens_per_s'] / 1e6:.2f} M trajectory tokens/s, {s['updates_per_s']:.1f} updates/s")
print(f"evaluation: {s['eval_env_steps_per_s']:.0f} environment steps/s with the model acting (planning included)")
EOF
}

micro() {
  python - <<'EOF'
"""gac_continuous.py's hot paths at Hopper size, on synthetic data (no environment, no dataset)."""
import os
import sys
import time

import torch
sys.path.insert(0, os.getcwd())
import gac_continuous as g

small = os.environ.get("SMALL") == "1"
parts = os.environ.get("PARTS", "act,eval,train,padding,profile").split(",")  # which timings to run
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cuda.enable_cudnn_sdp(False)  # as the scripts run (they turn cuDNN's attention off on a GPU)
N, T = (40, 96) if small else (2000, 1000)
SMALL_MODEL = dict(d_model=32, n_layer=1, n_head=2, batch_size=8) if small else {}  # SMALL=1: seconds on a CPU
reps = int(os.environ.get("REPS", 3 if small else 30))
obs_dim, act_dim = 11, 3
print(device, torch.cuda.get_device_name() if device.type == "cuda" else "", torch.__version__, flush=True)


def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def setup(**overrides):
    args = g.Args(**(SMALL_MODEL | overrides))
    padded = ((T + args.context_len - 1) // args.context_len) * args.context_len
    torch.manual_seed(0)
    model = g.GAC(obs_dim, act_dim, args, padded).to(device)
    states = torch.randn(N, padded, obs_dim, device=device)
    actions = torch.rand(N, padded, act_dim, device=device) * 2 - 1
    lengths = torch.randint(T // 3, T + 1, (N,), device=device)
    if os.environ.get("LENGTHS"):  # a real dataset's lengths: an .npz with `lengths`, e.g. the scripts' cache
        import numpy as np

        real = torch.as_tensor(np.load(os.path.expanduser(os.environ["LENGTHS"]))["lengths"]).clamp(max=T)
        lengths = real[torch.randint(len(real), (N,))].to(device)
    buffer = g.TrajectoryBuffer(states, actions, lengths, lengths.double(), torch.rand(N, device=device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=device.type == "cuda")  # as the script
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    mu = torch.zeros(N, args.n_latent, args.d_model, device=device)
    logvar = torch.full_like(mu, -5.0)
    gens = torch.Generator().manual_seed(1), torch.Generator(device=device).manual_seed(0)  # sampler, generator
    return args, model, buffer, opt, sched, mu, logvar, gens


def train_speed(label, compile_model=False, wait=False, cudnn_attention=False, **overrides):
    args, model, buffer, opt, sched, mu, logvar, gens = setup(**overrides)
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)  # True: torch's own choice on Hopper, a plan per shape
    if compile_model:
        model.generator = torch.compile(model.generator)
        model.prior = torch.compile(model.prior)
    def step():
        losses = g.train_iteration(model, opt, sched, buffer, N, mu, logvar, args, *gens, autocast)
        if wait and device.type == "cuda":  # the host waits for the device after every update
            torch.cuda.synchronize()
        return losses
    t0 = time.time()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.time() - t0
    tokens = 0.0
    t0 = time.time()
    for _ in range(reps):
        tokens = tokens + step()["charts/tokens"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    print(f"train {label}, batch {args.batch_size}: {reps / dt:.1f} updates/s, "
          f"{float(tokens) / dt / 1e6:.2f} M trajectory tokens/s (warm-up {warm:.0f} s)", flush=True)
    torch.backends.cuda.enable_cudnn_sdp(False)


def act_speed(num_envs=50):
    args, model, *_ = setup()
    model.eval()
    z0 = torch.randn(num_envs, args.n_latent, args.d_model, device=device)
    s0 = torch.randn(num_envs, obs_dim, device=device)
    with torch.no_grad():
        plan = model.plan(z0, s0)[1]
    states, action = torch.randn(num_envs, obs_dim, device=device), torch.zeros(num_envs, act_dim, device=device)
    t = torch.randint(0, 1000 - 600, (num_envs,), device=device)  # the episodes at different steps, as in a rollout
    caches = [{} for _ in model.generator.blocks]
    for _ in range(5):
        action = g.act(model, states, action, t, plan, caches, autocast)
        action.cpu()
        t += 1
    t0 = time.time()
    n = 20 if small else 500
    for _ in range(n):
        action = g.act(model, states, action, t, plan, caches, autocast)
        action.cpu()  # the rollout copies each step's actions to the host for the environments
        t += 1
    dt = (time.time() - t0) / n
    print(f"act {num_envs} envs: {1000 * dt:.2f} ms per call -> {num_envs / dt:.0f} model steps/s", flush=True)
    t0 = time.time()
    g.exploit_plans(model, s0, args, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    g.exploit_plans(model, s0, args, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"exploit_plans {num_envs} states x {args.num_candidates} candidates x {args.exploit_steps} steps: "
          f"{time.time() - t0:.2f} s", flush=True)


def eval_speed(num_envs=4 if small else 50):
    """An evaluation as the script runs it, exploitation at each reset and the model acting, on Hopper-v5 kept alive
    for 1,000 steps (terminate_when_unhealthy=False, so every episode is full length), with the environments
    stepped in this process (SyncVectorEnv, the default) or one subprocess each (AsyncVectorEnv, --async-envs)."""
    import gymnasium as gym
    import numpy as np

    args, model, *_ = setup()
    steps = 50 if small else 1000
    for vector_env in (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv):
        make = [lambda: gym.make("Hopper-v5", terminate_when_unhealthy=False, max_episode_steps=steps)] * num_envs
        envs = vector_env(make, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        t0 = time.time()
        episodes = g.rollout(
            envs, model, lambda s0: (g.exploit_plans(model, s0, args, autocast)[0], {}), num_envs,
            lambda obs: obs.astype(np.float32), 0, autocast, "evaluate",
        )  # fmt: skip
        dt = time.time() - t0
        envs.close()
        print(f"evaluation, {num_envs} episodes of {steps} steps, {vector_env.__name__}: {dt:.1f} s, "
              f"{sum(episodes['lengths']) / dt:.0f} environment steps/s with the model acting", flush=True)  # fmt: skip


def padding_speed(batch=int(os.environ.get("BATCH", "8" if small else "64"))):
    """One forward-backward pass of the likelihoods on batches drawn by length, every block computed or only the
    blocks that hold steps (what train_iteration does)."""
    args, model, buffer, *_ = setup()
    K, sampler = args.context_len, torch.Generator().manual_seed(1)
    cpu_lengths = buffer.lengths.cpu()
    batches = []
    for _ in range(reps):
        idx = g.sample_batch(cpu_lengths, N, batch, 0.0, sampler)
        lengths = cpu_lengths[idx]
        T_batch = int(-(-int(lengths.max()) // K) * K)
        blocks = (torch.arange(T_batch // K) < (lengths[:, None] + K - 1) // K).flatten().nonzero().squeeze(1)
        batches.append((idx.to(device), lengths.to(device), T_batch, blocks.to(device)))
    full = sum(len(b[3]) for b in batches) / sum(len(b[0]) * b[2] // K for b in batches)
    for skip in (False, True, False, True):
        t0, tokens = time.time(), 0.0
        for idx, lengths, T_batch, blocks in batches:
            states, actions = buffer.states[idx, :T_batch], buffer.actions[idx, :T_batch]
            mask, timesteps = g.valid_mask(lengths, T_batch), torch.arange(T_batch, device=device).expand(len(idx), -1)
            z0 = torch.randn(len(idx), args.n_latent, args.d_model, device=device, requires_grad=True)
            with autocast():
                action_ll, return_ll, _ = g.log_likelihoods(
                    model, z0, states[:, 0], states, actions, timesteps, mask, buffer.y[idx].float(), 0.1,
                    blocks if skip else None,
                )  # fmt: skip
            (action_ll + return_ll).sum().backward()
            tokens = tokens + 2 * mask.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        print(f"forward-backward, batch {batch}, {'only the blocks that hold steps' if skip else 'every block'}: "
              f"{dt / reps:.3f} s, {float(tokens) / dt / 1e6:.3f} M trajectory tokens/s "
              f"({100 * full:.0f} % of the blocks hold steps)", flush=True)  # fmt: skip


def kernel_profile(updates=5):
    """Where an update spends its time, operator by operator (device time on a GPU, CPU time here)."""
    from torch.profiler import ProfilerActivity, profile

    args, model, buffer, opt, sched, mu, logvar, gens = setup()
    for _ in range(3):
        g.train_iteration(model, opt, sched, buffer, N, mu, logvar, args, *gens, autocast)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(updates):
            g.train_iteration(model, opt, sched, buffer, N, mu, logvar, args, *gens, autocast)
        if cuda:
            torch.cuda.synchronize()
    print(f"the operators of {updates} updates, by their own time:")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), flush=True)


if "act" in parts:
    act_speed()
if "eval" in parts:
    eval_speed()
if "train" in parts or "attention" in parts:  # attention: only the two timings that compare the backends
    train_speed("default (1 inner step, bf16 on a GPU)")
    train_speed("cuDNN attention (torch's default on Hopper; every batch a new number of blocks)", cudnn_attention=True)
if "train" in parts:
    train_speed("the host waiting for the device after each update", wait=True)
    train_speed("no inner steps", inner_steps=0)
    train_speed("three inner steps (--inner-steps 3, the default until 2026-11-27)", inner_steps=3)
    train_speed("inner steps on 8 random blocks (--inner-blocks 8)", inner_blocks=8)
    train_speed("a larger batch", batch_size=256)
    if os.environ.get("COMPILE", "1") == "1":
        train_speed("torch.compile", compile_model=True)
if "padding" in parts:
    padding_speed()
if "profile" in parts:
    kernel_profile(1 if small else 5)
EOF
}

fit() {
  ((${#EXTRA[@]})) || fail "--fit <dataset-id> -- <run folders or offline.pt files>"
  OMP_NUM_THREADS=1 python - "$FIT_DATA" "${EXTRA[@]}" <<'EOF'
"""Held-out fit: the ELBO of offline models (gac_continuous.py --save-model) on trajectories of a dataset, each model
with one and the same inference, so that training settings compare by the models they leave, not by their own
inner steps (a run's logged ELBO is measured after its inner steps on that very batch)."""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import gac_continuous as g

torch.set_num_threads(1)  # a matmul's sums depend on its threads: one thread, the same figures on any CPU
dataset_id, paths = sys.argv[1], sys.argv[2:]
sys.argv[0] = "benchmark.sh --fit"  # the name the script's one-line errors start with
n_trajectories = int(os.environ.get("FIT_TRAJECTORIES", 256))
steps, lr, noise_every, draws = 40, 0.05, 10, 8


def episodes(dataset):
    env = dataset.recover_environment(eval_env=True)
    scale = g.ActionScaler(env.action_space)
    env.close()
    states, actions, rewards = g.read_episodes(dataset)
    return states, [scale.to_model(a) for a in actions], g.episode_returns(rewards)


test = g.load_minari_dataset(dataset_id)
states, actions, returns_raw = episodes(test)
ref_min, ref_max, _ = g.reference_scores(test, returns_raw)
pick = np.random.default_rng(0).choice(len(states), min(n_trajectories, len(states)), replace=False)
print(f"{dataset_id}: {len(pick)} of its {len(states)} trajectories (drawn with seed 0); per trajectory {steps} Adam "
      f"steps of {lr} on q(z0) from N(0, I), fresh noise every {noise_every}, no free bits; ELBO over {draws} draws")
for path in paths:
    path = os.path.join(path, "offline.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        sys.exit(f"benchmark.sh: error: no {path} (a run with --save-model writes offline.pt)")
    checkpoint = g.load_checkpoint(path, "--fit", {"model", "args"})  # one line for a file that is none
    args = g.Args(**checkpoint["args"])
    dims = tuple(checkpoint["model"][f"generator.embed_{x}.weight"].shape[1] for x in ("state", "action"))
    if dims != (states[0].shape[1], actions[0].shape[1]):
        sys.exit(f"benchmark.sh: error: {path} models {dims[0]} state and {dims[1]} action dimensions, {dataset_id} has "
                 f"{states[0].shape[1]} and {actions[0].shape[1]}: give a dataset of the environment it was trained on")
    train_states = g.read_episodes(g.load_minari_dataset(g.resolve_dataset_id(args)))[0]
    normalize = g.StateNormalizer(np.concatenate(train_states))  # as the model was trained
    max_len = checkpoint["model"]["generator.embed_timestep.weight"].shape[0]
    model = g.GAC(states[0].shape[1], actions[0].shape[1], args, max_len)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    K = args.context_len
    T = int(math.ceil(max(len(actions[i]) for i in pick) / K) * K)
    s, a, lengths = g.pad_trajectories([normalize(states[i]) for i in pick], [actions[i] for i in pick], T,
                                       torch.device("cpu"))  # fmt: skip
    y = torch.as_tensor(g.normalize_returns(returns_raw[pick], ref_min, ref_max), dtype=torch.float32)
    mask, timesteps = g.valid_mask(lengths, T), torch.arange(T).expand(len(pick), T)
    blocks = (torch.arange(T // K) < (lengths[:, None] + K - 1) // K).flatten().nonzero().squeeze(1)

    def log_likelihoods(z0):
        return g.log_likelihoods(model, z0, s[:, 0], s, a, timesteps, mask, y, args.return_std, blocks)[:2]

    torch.manual_seed(0)
    shape = (len(pick), args.n_latent, args.d_model)
    mu, logvar = torch.zeros(shape), torch.zeros(shape)
    for _ in range(steps // noise_every):
        mu, logvar = g.fit_local_posteriors(
            mu, logvar, torch.randn(shape), lambda z0: sum(log_likelihoods(z0)), noise_every, lr, 0.0
        )
    with torch.no_grad():
        posterior = [log_likelihoods(mu + (0.5 * logvar).exp() * torch.randn(shape)) for _ in range(draws)]
        prior = [log_likelihoods(torch.randn(shape)) for _ in range(draws)]
    action_ll, return_ll = (torch.stack(x).mean(0) for x in zip(*posterior, strict=True))
    prior_action_ll = torch.stack([p[0] for p in prior]).mean(0)
    kl = g.gaussian_kl(mu, logvar).sum(1)
    n_steps = mask.sum()
    print(f"{path}: ELBO {float((action_ll + return_ll - kl).mean()):.2f} nats per trajectory, log p(actions | z) "
          f"{float(action_ll.sum() / n_steps):.4f} per step ({float(prior_action_ll.sum() / n_steps):.4f} with z0 from "
          f"the prior), log p(y | z) {float(return_ll.mean()):.3f}, KL {float(kl.mean()):.2f}", flush=True)
EOF
}

FAILED_JOBS=0
case "$MODE" in
  dry) write_jobs; cat "$PREPARE_FILE" "$JOBS_FILE"; rm -f "$PREPARE_FILE" "$JOBS_FILE" ;;
  local)
    write_jobs
    run_local
    collect
    if ((FAILED_JOBS)); then  # the table holds what the others finished
      echo "benchmark.sh: $FAILED_JOBS job(s) failed or were stopped: see $OUT/logs/${STAMP}_failed.txt" >&2
      exit 1
    fi
    ;;
  slurm) write_jobs; run_slurm ;;
  collect) collect ;;
  speed) speed ;;
  micro) micro ;;
  fit) fit ;;
esac
