#!/usr/bin/env bash
# One command from a workstation to a Cloud TPU VM or pod slice: create (or reuse) the TPU,
# put this project on every worker, bring the data, train (one model or the whole ensemble
# recipe), keep the outputs, optionally delete the TPU. Run with --help for the options.
#
# How commands reach the workers: each remote step is ONE `gcloud compute tpus tpu-vm ssh
# NAME --worker=all --command=...`. gcloud opens one ssh per worker concurrently, waits for
# all of them and exits non-zero if any worker failed. The remote command prefixes every line
# with "[worker N] " itself (N read from the TPU metadata server), so interleaved logs of a
# pod slice stay readable. --worker=all is passed for single-host TPUs too (it is worker 0).
set -euo pipefail
# bash 5.2's patsub_replacement makes & in ${var//pattern/replacement} stand for the match; the
# replacements here are user paths and URLs (--output gs://b/run&1), to be taken as they are
shopt -u patsub_replacement 2>/dev/null || true

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
usage: launch_tpu.sh [options] [-- TRAIN_ARGS...]

Create (or reuse) a Cloud TPU VM / pod slice, install leaf_xla on every worker, fetch the
data and run `python -m leaf_xla train --data-dir D --out-dir O [--resume] TRAIN_ARGS...`
(or, with --recipe, `python -m leaf_xla recipe --config configs/ensemble.yaml --data-dir D
--out-dir O [--resume] TRAIN_ARGS...`) on all workers with PJRT_DEVICE=TPU. Everything after
`--` is passed to that command verbatim (quoted for the remote shell); for --recipe that is
recipe options, then `--` and the options of every train run:
  launch_tpu.sh ... --recipe -- --fit-weights -- --epochs 10

TPU
  --name NAME              TPU (and queued resource) name                [leaf-xla]
  --zone ZONE              default: gcloud config get-value compute/zone
  --project PROJECT        default: gcloud config get-value project
  --accelerator-type T     v2-N, v3-N, v4-N, v5p-N (N = TensorCores, v4/v5p: multiple of 8),
                           v5litepod-N, v6e-N (N = chips, power of two); e.g. v3-8, v4-8,
                           v4-32, v5litepod-16. Required unless --existing. N > 8 = pod slice.
  --version V              runtime version; default by generation: v2/v3/v4
                           tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                   spot capacity (cheaper, can be preempted: see --resume)
  --queued                 create through `gcloud compute tpus queued-resources` and wait until
                           it is ACTIVE (for scarce capacity, large v4/v5e/v5p/v6e slices)
  --queue-timeout DUR      give up queueing after DUR (--valid-until-duration, e.g. 6h)
  --create-arg ARG         extra flag for the create command, repeatable
                           (e.g. --create-arg=--reserved --create-arg=--network=my-net)
  --existing               use an existing READY TPU, never create one
  --resume                 continue a run: re-create the TPU if it is gone or PREEMPTED,
                           restore --output, if given, onto every worker (it must hold a
                           <run>/last.pt), pass --resume to train / the recipe
  --delete                 delete the TPU (or queued resource) at the end, even if training
                           failed (not if --fetch failed and there is no --output)

Project code on the workers
  --copy-local             copy this checkout (git archive of HEAD plus uncommitted changes to
                           tracked files; untracked files are not copied)   [default]
  --repo URL [--ref REF]   git clone URL and check out REF (branch, tag or sha) [REF: HEAD]
  --skip-setup             do not copy or pip-install the project (already on the VM)
  --pip-arg ARG            extra argument for `pip install -e '.[tpu]'`, repeatable
  --python PY              Python on the VM                                   [python3]
  --weights-file LOCAL[:REMOTE]
                           copy a weights file to every worker, to REMOTE relative to the
                           project checkout there (where training runs) [weights/NAME of LOCAL];
                           repeatable. The `weights:` files that the configs of the run name
                           (--recipe: of its members; train: --config, --weights) must be sent
                           so, or be in the copied checkout: checked before any TPU is created
                           (the configs are read from this checkout; not with --skip-setup)

Data
  --data gs://BUCKET/PATH  `gcloud storage rsync -r` it into the data dir on every worker
  --data kaggle:COMP       `kaggle competitions download -c COMP` + unzip on every worker
                           (needs ~/.kaggle/kaggle.json there, or --kaggle-json)
  --kaggle-json FILE       copy this Kaggle API token (mode 0600) to every worker for the
                           download, then delete it there (~/.kaggle is left alone)
  --prepare-size N         run `python -m leaf_xla prepare --data-dir D --size N` first
  (no --data: the data is expected to be in the data dir already)

Training and outputs
  --recipe                 run the ensemble recipe instead of one train run
  --recipe-config FILE     config of --recipe                    [configs/ensemble.yaml]
  --env KEY=VALUE          export on the workers, repeatable (e.g. XLA_PERSISTENT_CACHE_PATH=...)
  --output gs://B/PATH     sync the out dir there from worker 0 every --sync-every seconds
                           and after the run (never a run whose last.pt is older than the
                           bucket's, never temp files); --resume restores it first. A new run
                           refuses an --output that holds a run; a failed listing stops
  --sync-every SECONDS     0 = only after the run                                [600]
  --fetch LOCAL_DIR        scp --recurse the out dir from worker 0 to LOCAL_DIR at the end
  --setup-only             stop after setup (code, install, data, prepare)

Paths on the VM (relative = relative to the remote home; quote a leading ~)
  --remote-dir DIR         project checkout                                   [leaf_xla]
  --remote-data-dir DIR    --data-dir of the run     [data/plant-pathology-2020-fgvc7]
  --remote-out-dir DIR     --out-dir of the run                         [leaf_xla_runs]

Other
  --OPTION=VALUE           also accepted; needed for values starting with --
                           (e.g. --create-arg=--reserved, --pip-arg=--no-cache-dir)
  --dry-run                print every command, one per line, shell-quoted, and run none
                           (only `gcloud config get-value` and local git lookups run)
  -h, --help               this text

Examples
  launch_tpu.sh --accelerator-type v3-8 --data gs://my-bucket/plant-pathology-2020-fgvc7 \
    -- --model tf_efficientnet_b7 --config configs/tf_efficientnet_b7.yaml
  launch_tpu.sh --name leaf-pod --accelerator-type v4-32 --spot --output gs://my-bucket/runs/b7 \
    --data kaggle:plant-pathology-2020-fgvc7 --kaggle-json ~/.kaggle/kaggle.json --recipe \
    --weights-file weights/resnet152v2_imagenet.safetensors
  launch_tpu.sh --name leaf-pod --accelerator-type v4-32 --spot --output gs://my-bucket/runs/b7 \
    --data kaggle:plant-pathology-2020-fgvc7 --recipe --resume \
    --weights-file weights/resnet152v2_imagenet.safetensors    # after a preemption

How it runs: every remote step is one `gcloud compute tpus tpu-vm ssh NAME --worker=all
--command=...` (also on single-host TPUs); gcloud runs it on all workers at once, streams
their output, each line prefixed "[worker N] ", and fails if any worker fails. When training
fails on one worker, the launcher stops it on every worker (SIGTERM, SIGKILL 10 s later), so
that the hosts of a pod do not wait for it forever.
Errors in the options exit with status 2 and one line on stderr; otherwise the exit status
is that of the failing step (for training: that of the first worker that failed).
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
fail() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# options
NAME=leaf-xla ZONE='' PROJECT='' ACCEL='' VERSION='' SPOT=0 QUEUED=0 QUEUE_TIMEOUT=''
EXISTING=0 RESUME=0 DELETE=0 DRY_RUN=0 SETUP_ONLY=0 SKIP_SETUP=0 RECIPE=0
COPY_LOCAL=0 REPO='' REF='' DATA='' KAGGLE_JSON='' PREPARE_SIZE='' OUTPUT='' FETCH=''
RECIPE_CONFIG=configs/ensemble.yaml SYNC_EVERY=600 PY=python3
REMOTE_DIR=leaf_xla REMOTE_DATA=data/plant-pathology-2020-fgvc7 REMOTE_OUT=leaf_xla_runs
ENVS=() CREATE_ARGS=() PIP_ARGS=() TRAIN_ARGS=() WEIGHTS_FILES=()

while (($#)); do
  opt=$1 val='' inline=0
  if [[ $opt == --*=* ]]; then val=${opt#*=}; opt=${opt%%=*}; inline=1; fi
  case $opt in
    -h|--help|--spot|--queued|--existing|--resume|--delete|--dry-run|--setup-only|\
    --skip-setup|--recipe|--copy-local)
      ((inline)) && die "option $opt takes no value"
      case $opt in
        -h|--help) usage; exit 0 ;;
        --spot) SPOT=1 ;;
        --queued) QUEUED=1 ;;
        --existing) EXISTING=1 ;;
        --resume) RESUME=1 ;;
        --delete) DELETE=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --setup-only) SETUP_ONLY=1 ;;
        --skip-setup) SKIP_SETUP=1 ;;
        --recipe) RECIPE=1 ;;
        --copy-local) COPY_LOCAL=1 ;;
      esac
      ;;
    --name|--zone|--project|--accelerator-type|--version|--runtime-version|--queue-timeout|\
    --create-arg|--repo|--ref|--pip-arg|--python|--data|--kaggle-json|--prepare-size|\
    --recipe-config|--env|--output|--sync-every|--fetch|--remote-dir|--remote-data-dir|\
    --remote-out-dir|--weights-file)
      if ((!inline)); then  # a value starting with -- needs the --option=VALUE form
        (($# >= 2)) || die "option $opt needs a value"
        [[ $2 != --* ]] || die "option $opt needs a value (for one starting with --, write $opt=$2)"
        val=$2
        shift
      fi
      case $opt in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --project) PROJECT=$val ;;
        --accelerator-type) ACCEL=$val ;;
        --version|--runtime-version) VERSION=$val ;;
        --queue-timeout) QUEUE_TIMEOUT=$val ;;
        --create-arg) CREATE_ARGS+=("$val") ;;
        --repo) REPO=$val ;;
        --ref) REF=$val ;;
        --pip-arg) PIP_ARGS+=("$val") ;;
        --python) PY=$val ;;
        --data) DATA=$val ;;
        --kaggle-json) KAGGLE_JSON=$val ;;
        --prepare-size) PREPARE_SIZE=$val ;;
        --recipe-config) RECIPE_CONFIG=$val ;;
        --env) ENVS+=("$val") ;;
        --output) OUTPUT=${val%/} ;;
        --sync-every) SYNC_EVERY=$val ;;
        --fetch) FETCH=$val ;;
        --remote-dir) REMOTE_DIR=$val ;;
        --remote-data-dir) REMOTE_DATA=$val ;;
        --remote-out-dir) REMOTE_OUT=$val ;;
        --weights-file) WEIGHTS_FILES+=("$val") ;;
      esac
      ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $opt (see --help)" ;;
    *) die "unexpected argument '$opt' (training arguments go after --; see --help)" ;;
  esac
  shift
done

# ---------------------------------------------------------------------------------------------
# validation (everything that can be checked before touching gcloud)
[[ -n $REPO && $COPY_LOCAL == 1 ]] && die "--repo and --copy-local exclude each other"
[[ -n $REF && -z $REPO ]] && die "--ref needs --repo"
[[ -z $REPO ]] && COPY_LOCAL=1
# git would read a leading '-' as an option (--upload-pack=... runs a command on the VM)
[[ $REPO == -* ]] && die "bad --repo '$REPO': a URL or path cannot start with '-'"
[[ $REF == -* ]] && die "bad --ref '$REF': a branch, tag or sha cannot start with '-'"
((SKIP_SETUP)) && COPY_LOCAL=0
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "bad --name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
if [[ -n $DATA && $DATA != gs://?* && $DATA != kaggle:?* ]]; then
  die "bad --data '$DATA': expected gs://BUCKET/PATH or kaggle:COMPETITION"
fi
[[ -n $KAGGLE_JSON && ! -f $KAGGLE_JSON ]] && die "--kaggle-json: no such file: $KAGGLE_JSON"
[[ -n $KAGGLE_JSON && $DATA != kaggle:* ]] \
  && die "--kaggle-json needs --data kaggle:COMPETITION (the token is only used, then deleted, by the download)"
[[ -z $PREPARE_SIZE || $PREPARE_SIZE =~ ^[1-9][0-9]*$ ]] \
  || die "bad --prepare-size '$PREPARE_SIZE': expected a positive integer"
[[ $SYNC_EVERY =~ ^[0-9]+$ ]] || die "bad --sync-every '$SYNC_EVERY': expected seconds"
[[ ${LAUNCH_TPU_STOP_GRACE_SECONDS:-0} =~ ^[0-9]+$ ]] \
  || die "bad LAUNCH_TPU_STOP_GRACE_SECONDS '$LAUNCH_TPU_STOP_GRACE_SECONDS': expected seconds"
[[ -z $OUTPUT || $OUTPUT == gs://?* ]] || die "bad --output '$OUTPUT': expected gs://BUCKET/PATH"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$kv': expected KEY=VALUE"
done

# --weights-file LOCAL[:REMOTE] -> WEIGHTS_LOCAL[i] goes to WEIGHTS_REMOTE[i] (./ dropped).
# A LOCAL that exists is taken whole, so a local name with a colon needs no REMOTE.
WEIGHTS_LOCAL=() WEIGHTS_REMOTE=()
for spec in ${WEIGHTS_FILES[@]+"${WEIGHTS_FILES[@]}"}; do
  local_path=$spec remote=''
  if [[ ! -f $spec && $spec == *:* ]]; then local_path=${spec%:*} remote=${spec##*:}; fi
  [[ -f $local_path && -r $local_path ]] \
    || die "--weights-file: no such file (or not readable): $local_path"
  [[ -n $remote ]] || remote=weights/${local_path##*/}
  WEIGHTS_LOCAL+=("$local_path")
  WEIGHTS_REMOTE+=("${remote#./}")
done

# config_file NAME: this checkout's file of a config as find_config resolves it on a worker
# (a path relative to the checkout, or the name of a shipped config); nothing if none.
config_file() {
  local name=$1 shipped
  shipped=${name%.yaml}
  shipped=$ROOT/src/leaf_xla/configs/${shipped##*/}.yaml
  if [[ $name == /* ]]; then
    [[ -f $name ]] && printf '%s' "$name"
  elif [[ -f $ROOT/$name ]]; then
    printf '%s' "$ROOT/$name"
  elif [[ $name != */* || $name == configs/* || $name == ./* ]] && [[ -f $shipped ]]; then
    printf '%s' "$shipped"
  fi
  return 0
}
# yaml_values KEY FILE: the values of every `KEY: value` line (any indent, quotes dropped).
yaml_values() {
  sed -n -e "s/^[[:space:]-]*$1:[[:space:]]*\([^#]*[^#[:space:]]\).*/\1/p" -- "$2" \
    | sed -e "s/^[\"']\(.*\)[\"']\$/\1/"
}
# option_values NAME WORD...: the values of --NAME V / --NAME=V among the words.
option_values() {
  local name=$1 prev=''
  shift
  for word in "$@"; do
    [[ $prev == "--$name" ]] && printf '%s\n' "$word"
    [[ $word == "--$name="* ]] && printf '%s\n' "${word#*=}"
    prev=$word
  done
  return 0
}

# needed_weights: "PATH<TAB>WHO" for each weights file the run's training reads: train args'
# --weights (for --recipe: those after its `--`, for every member), else the configs' `weights:`.
needed_weights() {
  local run_args=() file name weights i
  run_args=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  if ((RECIPE)); then
    run_args=()
    for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
      if [[ ${TRAIN_ARGS[i]} == -- ]]; then run_args=("${TRAIN_ARGS[@]:i+1}"); break; fi
    done
  fi
  weights=$(option_values weights ${run_args[@]+"${run_args[@]}"})
  if [[ -n $weights ]]; then
    printf '%s\ttrain argument --weights\n' "${weights##*$'\n'}"
    return 0
  fi
  if ((RECIPE)); then
    file=$(config_file "$RECIPE_CONFIG")
    [[ -n $file ]] || return 0
    yaml_values weights "$file" | sed "s|\$|\t--recipe-config $RECIPE_CONFIG|"
    yaml_values config "$file" | while IFS= read -r name; do
      file=$(config_file "$name")
      [[ -n $file ]] && yaml_values weights "$file" | sed "s|\$|\tthe recipe's config $name|"
    done
  else
    name=$(option_values config ${run_args[@]+"${run_args[@]}"})
    [[ -n $name ]] || return 0
    name=${name##*$'\n'}  # the last one counts
    file=$(config_file "$name")
    [[ -n $file ]] && yaml_values weights "$file" | sed "s|\$|\tconfig $name|"
  fi
  return 0
}

# Stop now, before any TPU exists, if training would not find a weights file on the workers:
# one the run needs (a path relative to the checkout) that is neither sent by --weights-file
# nor in the checkout that --copy-local sends.
check_weights() {
  local path who sent local_path
  while IFS=$'\t' read -r path who; do
    path=${path#./}
    [[ -z $path || $path == /* || $path == \~* ]] && continue  # the VM's own path: not known here
    for sent in ${WEIGHTS_REMOTE[@]+"${WEIGHTS_REMOTE[@]}"}; do
      [[ $sent == "$path" ]] && continue 2
    done
    if ((COPY_LOCAL)) && git -C "$ROOT" ls-files --error-unmatch -- "$path" >/dev/null 2>&1; then
      continue
    fi
    local_path=$path
    [[ ! -f $path && -f $ROOT/$path ]] && local_path=$ROOT/$path
    die "$who needs the weights file $path on every worker: pass --weights-file $local_path\
$([[ $path == "weights/${local_path##*/}" ]] || printf ':%s' "$path") (nothing was started)"
  done < <(needed_weights)
}

GEN='' CORES=0 POD=0
if [[ -z $ACCEL ]]; then
  ((EXISTING)) || die "--accelerator-type is required to create a TPU (e.g. v3-8, v4-32); \
pass --existing to use one that exists"
else
  if [[ ! $ACCEL =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-([0-9]{1,5})$ ]]; then
    hint=''
    [[ $ACCEL == v5e-* ]] && hint=' (TPU v5e is spelled v5litepod-N)'
    die "bad --accelerator-type '$ACCEL': expected v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N$hint"
  fi
  GEN=${BASH_REMATCH[1]}
  CORES=$((10#${BASH_REMATCH[2]}))
  pow2=$((CORES > 0 && (CORES & (CORES - 1)) == 0))
  case $GEN in
    v2|v3) ok=$((pow2 && CORES >= 8)); want='a power of two >= 8' ;;
    v4|v5p) ok=$((CORES >= 8 && CORES % 8 == 0)); want='a multiple of 8 (TensorCores)' ;;
    *) ok=$pow2; want='a power of two (chips)' ;;
  esac
  ((ok)) || die "bad --accelerator-type '$ACCEL': N must be $want"
  POD=$((CORES > 8))
  if [[ -z $VERSION ]]; then
    case $GEN in
      v5litepod) VERSION=v2-alpha-tpuv5-lite ;;
      v5p) VERSION=v2-alpha-tpuv5 ;;
      v6e) VERSION=v2-alpha-tpuv6e ;;
      *) VERSION=tpu-ubuntu2204-base ;;
    esac
  fi
fi

if ((COPY_LOCAL)); then
  git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1 \
    || die "--copy-local: $ROOT is not a git checkout with a commit (git archive needs one); commit, or use --repo URL"
fi
if ((!SKIP_SETUP)); then check_weights; fi

command -v gcloud >/dev/null 2>&1 \
  || die "gcloud not found on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk)"

config_value() {  # gcloud config get-value KEY, '' when unset
  local v
  v=$(gcloud config get-value "$1" 2>/dev/null) || v=''
  [[ $v == '(unset)' ]] && v=''
  printf '%s' "$v"
}
[[ -n $PROJECT ]] || PROJECT=$(config_value project)
[[ -n $PROJECT ]] || die "no project: pass --project or run 'gcloud config set project PROJECT'"
[[ -n $ZONE ]] || ZONE=$(config_value compute/zone)
[[ -n $ZONE ]] || die "no zone: pass --zone (e.g. us-central1-f for v3/v2, us-central2-b for v4) \
or run 'gcloud config set compute/zone ZONE'"

# ---------------------------------------------------------------------------------------------
# helpers
LOC=(--zone="$ZONE" --project="$PROJECT")
VM=(compute tpus tpu-vm)
QR=(compute tpus queued-resources)
POLL=${LAUNCH_TPU_POLL_SECONDS:-30}
STOP_GRACE=${LAUNCH_TPU_STOP_GRACE_SECONDS:-10}  # SIGTERM, then SIGKILL after this many seconds
TARBALL='' KAGGLE_TMP=''
TOUCHED=0   # a TPU was created or used: remind about it if we fail
DELETED=0

# q WORD: WORD quoted for a POSIX shell, readably: as is when safe, else in single quotes
# (printf %q when it holds control characters such as a newline, to stay on one line).
# A word starting with $DRY_VAR is a temp file of --dry-run, printed as its shell variable.
q() {
  local s=$1 sq="'"
  if [[ $s == "$DRY_VAR"* ]]; then
    printf '"$%s"' "${s#"$DRY_VAR"}"
  elif [[ -n $s && $s != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s' "$s"
  elif [[ $s == *[[:cntrl:]]* ]]; then
    printf '%q' "$s"
  else
    printf "'%s'" "${s//$sq/$sq\\$sq$sq}"
  fi
}
quoted() {  # quoted WORD...: the words quoted with q, separated by spaces
  local w sep=''
  for w in "$@"; do printf '%s' "$sep"; q "$w"; sep=' '; done
}

# run CMD...: --dry-run prints it (copy-pastable); otherwise echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quoted "$@")"
  else
    printf '+ %s\n' "$(quoted "$@")" >&2
    "$@"
  fi
}
comment() { if ((DRY_RUN)); then printf '# %s\n' "$*"; fi; }

# make_temp VAR PREFIX: VAR := a new temp file of mktemp (mode 0600, a name nobody can guess).
# --dry-run prints the mktemp line and VAR stands for "$VAR" in the commands printed after it.
DRY_VAR=$'\x01'
make_temp() {
  if ((DRY_RUN)); then
    # shellcheck disable=SC2016  # printed for the user's shell
    printf '%s=$(mktemp "${TMPDIR:-/tmp}/%s.XXXXXX")\n' "$1" "$2"
    printf -v "$1" '%s' "$DRY_VAR$1"
  else
    printf -v "$1" '%s' "$(mktemp "${TMPDIR:-/tmp}/$2.XXXXXX")"
  fi
}

# A path on the VM as a word for the remote shell: relative and ~/ paths are under $HOME.
rpath() {
  local p=$1
  case $p in
    /*) q "$p" ;;
    \~) printf \~ ;;
    \~/*) printf \~/; q "${p#\~/}" ;;
    *) printf \~/; q "$p" ;;
  esac
}
# The same path as the remote side of `gcloud ... scp` (relative to the remote home).
scp_path() {
  local p=$1
  case $p in
    \~/*) printf '%s' "${p#\~/}" ;;
    *) printf '%s' "$p" ;;
  esac
}

# remote BODY: the --command for every worker; lines are prefixed with "[worker N] ".
# shellcheck disable=SC2016  # expanded by the remote shell
WORKER_ID='w=$(curl -sf -m 10 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) || w=0'
remote() {
  # shellcheck disable=SC2016  # $HOME and $w are for the remote shell
  printf 'set -euo pipefail; export PATH="$HOME/.local/bin:$PATH"; %s; { %s; } 2>&1 | sed -u "s/^/[worker $w] /"' \
    "$WORKER_ID" "$1"
}
ssh_all() { run gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$(remote "$1")"; }
scp_all() { run gcloud "${VM[@]}" scp "$1" "$NAME:$2" "${LOC[@]}" --worker=all; }

vm_state() {
  gcloud "${VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true
}
qr_state() {
  gcloud "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true
}

create_vm() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  TOUCHED=1
  if ((QUEUED)); then
    local until=()
    [[ -n $QUEUE_TIMEOUT ]] && until=(--valid-until-duration="$QUEUE_TIMEOUT")
    run gcloud "${QR[@]}" create "$NAME" "${LOC[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" \
      ${spot[@]+"${spot[@]}"} ${until[@]+"${until[@]}"} ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
    wait_queued
  else
    run gcloud "${VM[@]}" create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCEL" --version="$VERSION" \
      ${spot[@]+"${spot[@]}"} ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
  fi
}

wait_queued() {
  local state last=''
  if ((DRY_RUN)); then
    comment "repeat until it prints ACTIVE:"
    run gcloud "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    return
  fi
  while :; do
    state=$(qr_state)
    case $state in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return ;;
      '') fail "queued resource $NAME disappeared while waiting for it" ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        fail "queued resource $NAME is $state; see: gcloud ${QR[*]} describe $NAME ${LOC[*]}" ;;
    esac
    [[ $state != "$last" ]] && note "queued resource $NAME is $state; waiting (Ctrl-C to stop)"
    last=$state
    sleep "$POLL"
  done
}

delete_tpu() {
  if ((QUEUED)); then
    run gcloud "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud "${VM[@]}" delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# Make sure a READY TPU named $NAME exists (create / reuse / re-create after preemption).
ensure_tpu() {
  if ((DRY_RUN)); then
    run gcloud "${VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
    ((EXISTING)) && return
    if ((RESUME)); then
      comment "--resume: only if the TPU above is not READY (e.g. PREEMPTED), delete it:"
      delete_tpu
      comment "--resume: only if it is missing or was just deleted, create it:"
    fi
    create_vm
    return
  fi
  local state qstate
  state=$(vm_state)
  if [[ $state == READY ]]; then
    ((EXISTING || RESUME)) \
      || die "TPU $NAME already exists in $ZONE (READY); pass --existing to use it or --resume to continue a run on it"
    note "using TPU $NAME (READY)"
    TOUCHED=1
    return
  fi
  if ((EXISTING)); then
    [[ -z $state ]] && die "TPU $NAME not found in zone $ZONE of project $PROJECT (--existing)"
    if ((RESUME)); then
      die "TPU $NAME is $state, not READY; drop --existing to let --resume re-create it"
    fi
    die "TPU $NAME is $state, not READY (--existing); pass --resume instead to re-create it"
  fi
  case $state in
    CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|STOPPING|DELETING)
      fail "TPU $NAME is $state; rerun when it is READY or gone" ;;
  esac
  if ((QUEUED)); then
    qstate=$(qr_state)
    case $qstate in
      '') ;;
      ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|CREATING)
        ((RESUME)) || die "queued resource $NAME already exists ($qstate); pass --resume to wait for it"
        TOUCHED=1
        wait_queued
        return ;;
      *)
        ((RESUME)) || die "queued resource $NAME already exists ($qstate); pass --resume to re-create it"
        note "queued resource $NAME is $qstate: deleting and re-creating it"
        run gcloud "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
        state='' ;;
    esac
  fi
  if [[ -n $state ]]; then
    ((RESUME)) || die "TPU $NAME already exists ($state); pass --resume to re-create it and continue"
    note "TPU $NAME is $state: deleting and re-creating it"
    run gcloud "${VM[@]}" delete "$NAME" "${LOC[@]}" --quiet
  fi
  create_vm
}

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if ((!DRY_RUN)); then rm -f ${TARBALL:+"$TARBALL"} ${KAGGLE_TMP:+"$KAGGLE_TMP"}; fi
  if ((rc != 0 && TOUCHED && !DELETED && !DRY_RUN)); then
    note "TPU $NAME may still be running (and billing); delete it with: gcloud ${VM[*]} delete $NAME ${LOC[*]}"
  fi
  return "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# the remote steps
D=$(rpath "$REMOTE_DIR")
DATA_DIR=$(rpath "$REMOTE_DATA")
OUT_DIR=$(rpath "$REMOTE_OUT")

# TREE: what --copy-local sends, HEAD plus the uncommitted changes to tracked files. Taken
# before any TPU exists: if git cannot record the changes, stop rather than send HEAD alone.
TREE=HEAD
snapshot_tree() {
  local out
  if ! out=$(git -C "$ROOT" stash create 2>&1); then
    fail "--copy-local: 'git stash create' failed, so your uncommitted changes cannot be copied \
(${out%%$'\n'*}); commit or stash them, or fix git, and rerun"
  fi
  out=${out##*$'\n'}  # the commit's sha: the last line; nothing when there are no changes
  if [[ -n $out ]]; then
    [[ $out =~ ^[0-9a-f]{40,64}$ ]] \
      || fail "--copy-local: 'git stash create' printed '$out', not a commit; commit your changes and rerun"
    TREE=$out
    note "copying HEAD plus the uncommitted changes to tracked files"
  fi
  [[ -n $(git -C "$ROOT" ls-files --others --exclude-standard | head -n 1) ]] \
    && note "untracked files are not copied (git add them, or use --repo)"
  return 0
}

code_step() {
  if ((COPY_LOCAL)); then
    make_temp TARBALL leaf_xla-src
    run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" "$TREE"
    scp_all "$TARBALL" leaf_xla_src.tar.gz
    run rm -f "$TARBALL"
    TARBALL=''
    ssh_all "mkdir -p $D && tar -xzf ~/leaf_xla_src.tar.gz -C $D && rm -f ~/leaf_xla_src.tar.gz"
  else
    local url ref
    url=$(q "$REPO")
    ref=$(q "${REF:-HEAD}")
    ssh_all "if [ ! -d $D/.git ]; then git clone -q -- $url $D; fi; git -C $D fetch -q -- origin $ref; \
git -C $D checkout -q --detach FETCH_HEAD; echo \"code: \$(git -C $D log -1 --oneline)\""
  fi
}

# --weights-file: each file is sent into a staging folder in the remote home (scp needs no
# quoting there), then moved to its place under the checkout on every worker.
WEIGHTS_STAGE=.leaf_xla_weights
weights_step() {
  ((${#WEIGHTS_LOCAL[@]})) || return 0
  local i target moves=''
  ssh_all "rm -rf ~/$WEIGHTS_STAGE && mkdir ~/$WEIGHTS_STAGE"
  for i in "${!WEIGHTS_LOCAL[@]}"; do
    scp_all "${WEIGHTS_LOCAL[i]}" "$WEIGHTS_STAGE/$i" \
      || fail "copying --weights-file ${WEIGHTS_LOCAL[i]} to the workers failed"
    case ${WEIGHTS_REMOTE[i]} in
      /*|\~|\~/*) target=$(rpath "${WEIGHTS_REMOTE[i]}") ;;
      *) target=$D/$(q "${WEIGHTS_REMOTE[i]}") ;;
    esac
    moves+="mkdir -p \"\$(dirname -- $target)\" && mv -f ~/$WEIGHTS_STAGE/$i $target && \
echo \"weights: $target\" && "
  done
  ssh_all "${moves}rmdir ~/$WEIGHTS_STAGE"
}

install_step() {
  local pip
  pip=$(quoted "$PY" -m pip install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} -e '.[tpu]')
  ssh_all "cd $D && $pip"
}

# --kaggle-json goes to its own 0700 folder on the workers (the user's ~/.kaggle stays as it
# is), sent from a 0600 copy so that scp creates it 0600, and is deleted after the download.
KAGGLE_DIR=.leaf_xla_kaggle
kaggle_token_step() {
  make_temp KAGGLE_TMP leaf_xla-kaggle
  run cp "$KAGGLE_JSON" "$KAGGLE_TMP"
  ssh_all "umask 077 && rm -rf ~/$KAGGLE_DIR && mkdir ~/$KAGGLE_DIR"
  if ! scp_all "$KAGGLE_TMP" "$KAGGLE_DIR/kaggle.json"; then
    ssh_all "rm -rf ~/$KAGGLE_DIR" || true
    fail "copying --kaggle-json to the workers failed"
  fi
  run rm -f "$KAGGLE_TMP"
  KAGGLE_TMP=''
}

data_step() {
  [[ -n $KAGGLE_JSON ]] && kaggle_token_step
  case $DATA in
    '')
      note "no --data: expecting the data in $REMOTE_DATA on the workers" ;;
    gs://*)
      ssh_all "mkdir -p $DATA_DIR && gcloud storage rsync -r $(q "$DATA") $DATA_DIR" ;;
    kaggle:*)
      local comp py token=''
      comp=$(q "${DATA#kaggle:}")
      py=$(q "$PY")
      # shellcheck disable=SC2016  # for the remote shell
      [[ -n $KAGGLE_JSON ]] && token="export KAGGLE_CONFIG_DIR=~/$KAGGLE_DIR; \
trap 'rm -rf ~/$KAGGLE_DIR' EXIT; chmod 600 ~/$KAGGLE_DIR/kaggle.json; "
      ssh_all "$token""if [ ! -f \"\${KAGGLE_CONFIG_DIR:-\$HOME/.kaggle}/kaggle.json\" ]; then \
echo \"error: no Kaggle credentials (~/.kaggle/kaggle.json) on \$(hostname); pass --kaggle-json FILE \
or use --data gs://...\" >&2; exit 2; fi; \
if [ -f $DATA_DIR/train.csv ]; then echo \"data already in $DATA_DIR\"; else \
command -v kaggle >/dev/null || $py -m pip install -q --user kaggle; mkdir -p $DATA_DIR; \
kaggle competitions download -c $comp -p $DATA_DIR; \
$py -m zipfile -e $DATA_DIR/$comp.zip $DATA_DIR; rm -f $DATA_DIR/$comp.zip; fi" ;;
  esac
}

prepare_step() {
  [[ -n $PREPARE_SIZE ]] || return 0
  ssh_all "cd $D && $(quoted "$PY" -m leaf_xla prepare) --data-dir $DATA_DIR --size $PREPARE_SIZE"
}

# --output: the state kept on worker 0 in ~/.cache/leaf_xla_launch: marks/RUN holds "EPOCH STEP"
# of RUN/last.pt as the bucket has it (recorded after a restore, updated after each upload).
# push uploads the out dir except temp files and every run whose last.pt is older than its
# mark (a run that started again from scratch never replaces the bucket's copy), and says why.
# run_state reads epoch and step from a last.pt (mmap: the tensors stay on disk), only for a
# last.pt written since its mark (a few seconds each: Python and torch start).
# shellcheck disable=SC2016  # for the remote shell
SYNC_FUNCTIONS='M=~/.cache/leaf_xla_launch; mkdir -p "$M/marks";
run_state() { @PY@ -c @READER@ "$1"; };
older() { set -- $1 $2; [ "$1" -lt "$3" ] || { [ "$1" -eq "$3" ] && [ "$2" -lt "$4" ]; }; };
run_of() { r=${1%/last.pt}; r=${r##*/}; };
hold() { held="$held|$(printf %s "$1" | sed "s/[][\\.*^\$+?(){}|]/\\\\&/g; s/,/\\\\x2c/g")"; };
record_marks() { rm -rf "$M/marks"; mkdir -p "$M/marks"; for f in @OUT_DIR@/*/last.pt; do
[ -f "$f" ] || continue; run_of "$f";
run_state "$f" > "$M/marks/$r" || { echo "error: cannot read epoch and step of $f" >&2; return 1; }; done; };
push_unlocked() { held=""; rm -rf "$M/next"; mkdir -p "$M/next"; for f in @OUT_DIR@/*/last.pt; do
[ -f "$f" ] || continue; run_of "$f";
if [ -f "$M/marks/$r" ] && [ ! "$f" -nt "$M/marks/$r" ]; then continue; fi;
if ! now=$(run_state "$f" 2>"$M/state.err"); then
echo "sync: cannot read $f ($(tail -n 1 "$M/state.err")): $r not uploaded"; hold "$r";
elif [ -f "$M/marks/$r" ] && older "$now" "$(cat "$M/marks/$r")"; then
echo "sync: $f is at epoch/step $now, older than the copy in @OUT@ ($(cat "$M/marks/$r")): $r not uploaded, the bucket keeps its copy"; hold "$r";
else echo "$now" > "$M/next/$r"; fi; done;
x=@TMP_RE@; if [ -n "$held" ]; then x="$x|^(${held#|})/"; fi;
if ! gcloud storage rsync -r -x "$x" @OUT_DIR@ @OUT@ > "$M/sync.log" 2>&1; then
echo "sync: gcloud storage rsync @OUT_DIR@ @OUT@ failed:"; tail -n 5 "$M/sync.log"; return 1; fi;
for n in "$M/next"/*; do if [ -e "$n" ]; then mv -f "$n" "$M/marks/"; fi; done;
echo "sync: uploaded to @OUT@"; [ -z "$held" ]; };
push() { ( flock 9; push_unlocked ) 9>"$M/lock"; };'
# Temp files of the atomic writes (.NAME.XXXX.tmp) never go to the bucket.
# shellcheck disable=SC2016  # a regular expression
TMP_FILES_RE='^(.*/)?\.[^/]*\.tmp$'

sync_functions() {  # SYNC_FUNCTIONS for this run, on one line
  local text=$SYNC_FUNCTIONS
  text=${text//@PY@/$(q "$PY")}
  text=${text//@READER@/$(q 'import sys, torch; s = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True); print(int(s["epoch"]), int(s["step"]))')}
  text=${text//@OUT_DIR@/$OUT_DIR}
  text=${text//@OUT@/$(q "$OUTPUT")}
  text=${text//@TMP_RE@/$(q "$TMP_FILES_RE")}
  printf '%s' "${text//$'\n'/ }"
}

# What --output holds decides what may run: --resume needs a <run>/last.pt there, and a new run
# must not find one (its uploads would replace it). A listing that fails stops the launcher.
check_output() {
  local pattern="$OUTPUT/*/last.pt" listing found
  if ((DRY_RUN)); then
    comment "--output: list the runs in the bucket; --resume needs one (a last.pt), a new run needs none:"
    run gcloud storage ls "$pattern"
    return
  fi
  printf '+ %s\n' "$(quoted gcloud storage ls "$pattern")" >&2
  if listing=$(gcloud storage ls "$pattern" 2>&1); then
    found=${listing%%$'\n'*}
  elif [[ $listing == *'matched no objects'* ]]; then
    found=''
  else
    fail "cannot list --output $OUTPUT: $(grep -m 1 ERROR <<<"$listing" || printf '%s' "${listing%%$'\n'*}") \
(check 'gcloud auth login', the bucket name and your access to it); nothing was started"
  fi
  if ((RESUME)) && [[ -z $found ]]; then
    die "--resume: $OUTPUT holds no <run>/last.pt, so there is no run to continue; \
drop --resume to start one, or fix --output"
  fi
  if ((!RESUME)) && [[ -n $found ]]; then
    die "--output $OUTPUT already holds a run ($found); pass --resume to continue it, \
or choose another --output (a new run would replace it)"
  fi
  return 0
}

# --resume with --output: every worker gets the bucket's copy (each host writes and reads its own
# complete run folders), so all hosts start from the same state; worker 0 records the marks.
pull_outputs_step() {
  local out
  out=$(q "$OUTPUT")
  comment "--resume: every worker restores $OUTPUT into its own out dir; worker 0 notes each run's epoch/step:"
  ssh_all "mkdir -p $OUT_DIR && gcloud storage rsync -r -x $(q "$TMP_FILES_RE") $out $OUT_DIR; \
if ! ls -d $OUT_DIR/*/last.pt >/dev/null 2>&1; then echo \"error: --resume: no <run>/last.pt in $OUT_DIR \
after restoring $out on \$(hostname)\" >&2; exit 1; fi; \
if [ \"\$w\" = 0 ]; then $(sync_functions) record_marks; fi; echo \"restored $out into $OUT_DIR\""
}

# A worker whose training fails prints FAILED_HERE; the launcher then runs STOP_BODY on every
# worker: SIGTERM to the training's process group (found by the pid the train step recorded, if
# it is still a leaf_xla process), SIGKILL after STOP_GRACE seconds; the training step of a
# worker stopped so prints FAILED_HERE_STOPPED.
FAILED_HERE='launch_tpu: training failed here'
FAILED_HERE_STOPPED='launch_tpu: training stopped here because another worker failed'
# shellcheck disable=SC2016  # for the remote shell
STOP_BODY='S=~/.cache/leaf_xla_launch; p=$(cat "$S/train.pid" 2>/dev/null) || exit 0;
grep -qa leaf_xla "/proc/$p/cmdline" 2>/dev/null || exit 0; touch "$S/stopped";
kill -TERM -- "-$p" 2>/dev/null || true; n=0;
while kill -0 -- "-$p" 2>/dev/null && [ $n -lt @GRACE@ ]; do sleep 1; n=$((n + 1)); done;
kill -KILL -- "-$p" 2>/dev/null || true; echo "launch_tpu: stopped training here"'

stop_command() {  # the remote command that stops training on a worker
  local body=${STOP_BODY//@GRACE@/$STOP_GRACE}
  remote "${body//$'\n'/ }"
}

# watch_workers: copy the training's output through; at the first worker failure it shows (the
# worker's FAILED_HERE line, or gcloud's "Command execution on worker N failed"), stop training
# on every worker, in the background, so that the output keeps flowing. Returns the failed
# worker's exit status (gcloud's own may be that of a worker it stopped), 0 if none failed.
watch_workers() {
  local line stopper='' failed=0
  local ours="^\[worker ([0-9]+)\] $FAILED_HERE \((exit status) ([0-9]+)\)"
  local gcloud='Command execution on worker ([0-9]+) failed with (exit status|return code) ([0-9]+)'
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s\n' "$line"
    ((failed)) && continue
    [[ $line =~ $ours || $line =~ $gcloud ]] || continue
    failed=${BASH_REMATCH[3]}
    ((failed)) || failed=1
    note "training failed on worker ${BASH_REMATCH[1]} (exit status ${BASH_REMATCH[3]}); \
stopping training on every worker"
    run gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$(stop_command)" </dev/null >&2 &
    stopper=$!
  done
  if [[ -n $stopper ]] && ! wait "$stopper"; then
    note "stopping training on the other workers failed: check them (gcloud ${VM[*]} ssh $NAME ${LOC[*]} --worker=all)"
  fi
  return "$failed"
}

# train_all: the training step on every worker, stopped on all of them when one fails (on a
# pod the others would wait for it forever in a collective, and gcloud waits for them all).
train_all() {
  local command
  command=$(train_command)
  if ((DRY_RUN)); then
    run gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$command"
    comment "when a worker's training fails, the launcher stops training on every worker with:"
    comment "$(quoted gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$(stop_command)")"
    return 0
  fi
  printf '+ %s\n' "$(quoted gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$command")" >&2
  gcloud "${VM[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$command" 2>&1 | watch_workers
  local statuses=("${PIPESTATUS[@]}")
  ((statuses[1])) && return "${statuses[1]}"
  return "${statuses[0]}"
}

train_command() {  # the remote command of the training step
  local module env='' cmd out
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do env+=" $(q "$kv")"; done
  if ((RECIPE)); then
    module=(leaf_xla recipe --config "$RECIPE_CONFIG")
  else
    module=(leaf_xla train)
  fi
  cmd="$(quoted "$PY" -m "${module[@]}") --data-dir $DATA_DIR --out-dir $OUT_DIR"
  # before the user's arguments: the recipe reads its own options up to a `--`
  ((RESUME)) && cmd+=" --resume"
  ((${#TRAIN_ARGS[@]})) && cmd+=" $(quoted "${TRAIN_ARGS[@]}")"
  local body="cd $D; export PJRT_DEVICE=TPU PYTHONUNBUFFERED=1$env; mkdir -p $OUT_DIR; "
  if [[ -n $OUTPUT ]]; then  # only worker 0 uploads; the others hold the same state
    out=$(q "$OUTPUT")
    body+="if [ \"\$w\" = 0 ]; then $(sync_functions) "
    ((RESUME)) || body+="rm -rf \"\$M/marks\"; mkdir -p \"\$M/marks\"; "
    # the sleep must not hold the log pipe open once the loop is killed
    ((SYNC_EVERY > 0)) && body+="(while sleep $SYNC_EVERY >/dev/null 2>&1; do push || true; done) & \
syncer=\$!; "
    body+="fi; "
  fi
  # training runs in a session of its own, so that the launcher can stop its whole process
  # group (STOP_BODY), and what it leaves behind is killed (it would keep the ssh session open
  # through the log pipe); a hang-up of the session (the launcher interrupted) still stops it;
  # a failure is announced at once, for the launcher to stop the others
  body+="S=~/.cache/leaf_xla_launch; mkdir -p \"\$S\"; rm -f \"\$S/stopped\"; \
setsid $cmd & p=\$!; echo \$p > \"\$S/train.pid\"; \
trap 'kill -TERM -- \"-\$p\" 2>/dev/null; exit 129' HUP; rc=0; wait \$p || rc=\$?; \
kill -KILL -- \"-\$p\" 2>/dev/null || true; rm -f \"\$S/train.pid\"; \
if [ \$rc != 0 ]; then if [ -f \"\$S/stopped\" ]; then echo \"$FAILED_HERE_STOPPED\"; \
else echo \"$FAILED_HERE (exit status \$rc)\"; fi; fi; "
  if [[ -n $OUTPUT ]]; then
    body+="if [ \"\$w\" = 0 ]; then "
    ((SYNC_EVERY > 0)) && body+="kill \"\$syncer\" 2>/dev/null || true; "
    body+="if ! push; then echo \"error: not every output reached $out (see the sync lines above)\"; \
if [ \$rc = 0 ]; then rc=1; fi; fi; fi; "
  fi
  body+="exit \$rc"
  remote "$body"
}

# ---------------------------------------------------------------------------------------------
# main
# first what can stop the launcher before any TPU exists
if ((COPY_LOCAL)); then snapshot_tree; fi
if [[ -n $OUTPUT ]] && ((!SETUP_ONLY)); then check_output; fi
if [[ -n $ACCEL ]]; then
  if ((POD)); then
    note "$ACCEL is a pod slice (several hosts): every step runs on all workers (--worker=all); \
keep your gcloud SSH key in ssh-agent (ssh-add ~/.ssh/google_compute_engine)"
  else
    note "$ACCEL is a single host"
  fi
fi
((DRY_RUN)) && note "dry run: printing the commands, running none"

ensure_tpu
if ((!SKIP_SETUP)); then code_step; fi
weights_step
data_step
if ((!SKIP_SETUP)); then install_step; fi
prepare_step
((SETUP_ONLY)) && { note "setup done (--setup-only)"; exit 0; }
((RESUME)) && [[ -n $OUTPUT ]] && pull_outputs_step

if ((DRY_RUN)); then
  what='train'
  ((RECIPE)) && what='run the recipe (training is one job across all hosts; predict and ensemble then read the host'"'"'s own files)'
  comment "every worker: $what, writing complete run folders to its own out dir$([[ -n $OUTPUT ]] \
    && printf '; worker 0 uploads them to %s' "$OUTPUT"):"
fi
rc=0
train_all || rc=$?
if ((rc)); then note "training failed (exit status $rc)"; fi

fetch_failed=0
if [[ -n $FETCH ]]; then
  run mkdir -p "$FETCH"
  run gcloud "${VM[@]}" scp --recurse "$NAME:$(scp_path "$REMOTE_OUT")" "$FETCH" "${LOC[@]}" \
    --worker=0 || fetch_failed=1
  if ((fetch_failed)); then note "fetching the outputs to $FETCH failed"; fi
fi
[[ -n $OUTPUT ]] && note "outputs: $OUTPUT"

if ((DELETE)); then
  if ((fetch_failed)) && [[ -z $OUTPUT ]]; then
    note "not deleting TPU $NAME: fetching the outputs failed and there is no --output copy"
  else
    delete_tpu
    DELETED=1
  fi
fi
((rc == 0 && fetch_failed)) && rc=1
exit "$rc"
