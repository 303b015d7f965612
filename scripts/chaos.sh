#!/usr/bin/env bash
# Kill `collect`, `export`, `optimize` and `evaluate` at random points and check that a rerun always
# completes with the result of an uninterrupted run and leaves no temporary files behind.
#
#   scripts/chaos.sh [N]        N kills per command (default 10)
#
# Per command: one uninterrupted reference run, then N rounds of: start the command, SIGKILL it after
# a random delay (40-100% of the reference run's time, so most kills land after start-up; a run that
# finishes before its kill is repeated with shorter delays, so every round kills one), rerun it
# to the end, compare the rerun's result with the reference (collect: the activation files, byte for
# byte; export: the folder, byte for byte, its manifest and card without the creation time; optimize:
# the stored configuration without timings; evaluate: the JSON it prints, without timings), and count
# the temporaries (.*.partial, .*.parts, .*.lock, .*.tmp, .*.old, an unfinished side's *.part.json, and
# a steered side's folder, kept only until its result is assembled) left in the cache and next to the
# export. Before each round, collect's store and optimize's whole cache are removed, so every round
# starts from scratch; export keeps its directions (collecting them again would only repeat the collect
# rounds), evaluate its directions and unmodified side (its rounds kill the steered side).
#
# Runs on the builtin smollm2-135m-instruct in a private cache under a temporary folder; only the
# converted model is reused (symlinked) from the shared cache. Environment: PYTHON (default python),
# SHARED_CACHE (default ~/.cache/alignment-artifacts), KEEP=1 keeps the work folder.
# Exit status 1 if any rerun failed or differed, or any temporary was left.
set -uo pipefail

N=${1:-10}
PY=${PYTHON:-python}
MODEL=smollm2-135m-instruct
SHARED=${SHARED_CACHE:-$HOME/.cache/alignment-artifacts}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/aa-chaos.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
export ALIGNMENT_ARTIFACTS_CACHE=$WORK/cache
CACHE=$ALIGNMENT_ARTIFACTS_CACHE
mkdir -p "$CACHE/models" "$WORK/out"
for folder in "$SHARED"/models/$MODEL-*; do
    [ -d "$folder" ] && ln -s "$folder" "$CACHE/models/"
done

aa() { "$PY" -m alignment_artifacts "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Small prompt files for optimize, cut from the builtin sets (nothing new is written into the repository);
# its check sizes are small too, so that a round takes seconds rather than minutes.
"$PY" - "$WORK" <<'EOF'
import json, sys
from alignment_artifacts.prompts import load_builtin
for name in ("harmful", "harmless"):
    json.dump([p.text for p in load_builtin(name).prompts[:8]], open(f"{sys.argv[1]}/{name}.json", "w"))
EOF

COLLECT=(collect --model "$MODEL" --prompts pairs --limit 4 --batch-size 2 --json)
EXPORT=(export --model "$MODEL" --mode ablate --format hf --out "$WORK/out/ablated" --force --json)
OPTIMIZE=(optimize --model "$MODEL" --harmful "$WORK/harmful.json" --harmless "$WORK/harmless.json" --trials 2
          --timeout 60 --search-size 4 --modes ablate --no-gate --max-tokens 8 --finalists 1
          --n-ordinary 8 --n-borderline 8 --n-capability 8 --judged-borderline 4 --judged-ordinary 4 --json)
# evaluate's steered side at width 4: chunks of 16 prompts, so kills land between saved chunks (its
# baseline and direction are measured once before the rounds, which kill the steered side only)
EVALUATE=(evaluate --model "$MODEL" --mode ablate --harmful "$WORK/harmful.json" --n-borderline 16 --n-ordinary 16
          --n-capability 16 --max-tokens 8 --generation-batch-size 4 --json)

prepare() {  # prepare NAME: the state each round starts from
    case $1 in
        collect) rm -rf "$CACHE"/activations/[!.]* ;;
        optimize) rm -rf "$CACHE"/{activations,directions,evaluation,configs,studies} ;;
        evaluate) rm -rf "$CACHE"/evaluation/*/steered ;;
    esac
}

result() {  # result NAME: the path holding the command's result
    case $1 in
        collect) echo "$CACHE"/activations/[!.]* ;;
        export) echo "$WORK/out/ablated" ;;
        optimize) echo "$CACHE/configs/$MODEL.json" ;;
        evaluate) echo "$WORK/evaluate-rerun.json" ;;  # what it prints
    esac
}

same() {  # same EXPECTED ACTUAL: equal results, timings and creation times aside
    "$PY" - "$1" "$2" <<'EOF'
import hashlib, json, sys
from pathlib import Path

VOLATILE = {"seconds", "created", "resumed", "reused", "seconds_this_run"}

def clean(value):
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    return [clean(v) for v in value] if isinstance(value, list) else value

def digest(path):
    if path.name == "README.md":  # the card's last line is the creation time
        return hashlib.sha256("\n".join(path.read_text().splitlines()[:-1]).encode()).hexdigest()
    if path.suffix == ".json":
        return json.dumps(clean(json.loads(path.read_text())), sort_keys=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()

def contents(root):
    if root.is_file():
        return {"": digest(root)}
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}

expected, actual = (contents(Path(p)) for p in sys.argv[1:3])
if not expected or expected != actual:
    print("differs:", sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)),
          file=sys.stderr)
    sys.exit(1)
EOF
}

leftovers() {
    find "$CACHE" "$WORK/out" \( -name '.*' \( -name '*.partial' -o -name '*.parts' -o -name '*.lock' \
         -o -name '*.tmp' -o -name '*.old' \) \) -o -name '*.part.json' \
         -o -path '*/evaluation/*/steered/?*' -prune 2> /dev/null
}

CORRUPT=0
LEFT=0
chaos() {  # chaos NAME ARGS...: a reference run and N kill-and-rerun rounds of one command
    local name=$1 started took delay pid killed=0 early=0 ok=0 bad=0 left=0 found i
    shift
    if [ "$name" = export ] || [ "$name" = evaluate ]; then  # directions (and baseline) first, so the timed
        # run is what every round repeats
        aa "$@" > /dev/null 2>&1
    fi
    prepare "$name"
    started=$(now)
    if ! aa "$@" > "$WORK/$name-rerun.json" 2> "$WORK/$name.err"; then
        echo "chaos: $name: the reference run failed:" >&2
        tail -5 "$WORK/$name.err" >&2
        CORRUPT=$((CORRUPT + 1))
        return
    fi
    took=$(since "$started")
    mkdir "$WORK/expected-$name"
    cp -r "$(result "$name")" "$WORK/expected-$name/"
    for ((i = 1; i <= N; i++)); do
        for scale in 1 0.7 0.5 0.35 0.25; do  # shorter delays while the run finishes before its kill
            prepare "$name"
            delay=$(awk -v t="$took" -v s="$scale" -v r="$RANDOM" \
                    'BEGIN { printf "%.2f", t * s * (0.4 + 0.6 * r / 32767) }')
            "$PY" -m alignment_artifacts "$@" > /dev/null 2>&1 &  # not through a function: $! must be python
            pid=$!
            sleep "$delay"
            kill -9 "$pid" 2> /dev/null
            wait "$pid" 2> /dev/null
            if [ $? = 137 ]; then  # 128 + SIGKILL: it was still running
                killed=$((killed + 1))
                break
            fi
            early=$((early + 1))
        done
        if aa "$@" > "$WORK/$name-rerun.json" 2> "$WORK/$name-rerun.err" \
                && same "$WORK/expected-$name/$(basename "$(result "$name")")" "$(result "$name")"; then
            ok=$((ok + 1))
        else
            bad=$((bad + 1))
            echo "chaos: $name round $i (killed after $delay s): the rerun failed or differs" >&2
            tail -3 "$WORK/$name-rerun.err" >&2
        fi
        found=$(leftovers)
        if [ -n "$found" ]; then
            left=$((left + $(echo "$found" | wc -l)))
            echo "chaos: $name round $i left: $found" >&2
        fi
    done
    printf 'chaos: %-8s reference run %5s s; %2d killed mid-run (%d more runs finished before their kill); reruns equal to the reference %2d/%d, corrupt %d, leftover temporaries %d\n' \
        "$name" "$took" "$killed" "$early" "$ok" "$N" "$bad" "$left"
    CORRUPT=$((CORRUPT + bad))
    LEFT=$((LEFT + left))
}

START=$(now)
chaos collect "${COLLECT[@]}"
chaos export "${EXPORT[@]}"
chaos optimize "${OPTIMIZE[@]}"
chaos evaluate "${EVALUATE[@]}"
echo "chaos: $N kills per command in $(since "$START") s: $CORRUPT corrupt results, $LEFT leftover temporaries"
[ "$CORRUPT" = 0 ] && [ "$LEFT" = 0 ]
