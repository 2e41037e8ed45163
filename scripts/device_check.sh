#!/usr/bin/env bash
# The checks to run on a lent GPU, in one go, with a markdown table of the numbers.
#
#   bash scripts/device_check.sh            # on the GPU machine, from the repository root
#   bash scripts/device_check.sh --tiny     # nano preset, tiny shapes, on CPU (what the tests run)
#   bash scripts/device_check.sh --only bench_bf16,train   # a subset of the steps
#
# Steps (each under its own `timeout`, so one hang costs only its own budget), in this order:
#   proto_warmstart, proto_gn, proto_adamw, proto_muon
#                 the paper's protocol: configs/paper_45m_warmstart.yaml (AdamW, 300 steps x 32 x 1024) and then
#                 configs/paper_45m.yaml's gn (the paper's inner optimizer, clipping, acceptance, EMA reading),
#                 adamw_lr3e-3 and muon_lr1e-2 from its checkpoint, 3 outer steps each at the paper's 45m shapes
#                 (N 122, b_inner 32, seq 1024, line search on N batches; baselines 122 micro-batches), on the
#                 synthetic language (C4 is offline here); model.memory: auto. Step times, losses, memory.
#                 The four budgets add up to 8 minutes
#   candidates    gn bench candidates at 45m: one GN inner step under each option alone (bf16; logits_chunk;
#                 attn_chunk; remat; scan_layers; bf16 + logits_chunk; bf16 + lean), times against plain f32,
#                 XLA temp bytes, and each one's numbers against its reference (tests/test_bench_candidates.py)
#   bench_f32     gn bench at the paper's 45m settings (b_inner 32, seq 1024, N 122), float32, the
#                 plain model (no logits chunking, no remat, no layer scan): the baseline
#   bench_lean    the same with the memory-lean model (logits_chunk, attn_chunk, remat, scan_layers) and
#                 --compute-dtype bfloat16 (mixed precision, float32 params)
#   compile_45m   gn bench --compile-only at 45m, b_inner 32, lean model (XLA's memory, nothing run)
#   compile_150m  gn bench --compile-only at 150m with b_inner 128, lean model
#   train         gn train of GN at 45m (N 122, b_inner 32, lean, bf16) for 3 outer steps on synthetic data from
#                 a RANDOM start with gn's defaults (the run that diverged on the H200; see docs/paper_protocol.md)
#   first_150m    gn train of GN at 150m (b_inner 128, N 4, lean, bf16), 1 outer step: seconds from the
#                 process start to the end of its first step
#   devices       the sharded-equality tests (tests/test_sharding.py) when jax sees several
#                 devices; skipped (and reported so) otherwise. The tests simulate 8 CPU devices
#                 (XLA_FLAGS), so on the device machine they check its jax version, not its GPUs
# The table goes to $OUT/device_check.md, or docs/device_check.md when $OUT is unset (or to
# --out PATH); logs and raw JSON beside it in device_check_logs/.
#
# Environment: PYTHON (default python3), STEP_TIMEOUT_S (default per step, below: the
# full-size budget adds up to ~9 minutes), JAX_PLATFORMS (default cuda; cpu with --tiny).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TINY=0
ONLY=""
OUTFILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --only) ONLY="$2"; shift ;;
    --out) OUTFILE="$2"; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (--tiny, --only STEPS, --out PATH)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$OUTFILE" ]; then
  if [ -n "${OUT:-}" ]; then OUTFILE="$OUT/device_check.md"; else OUTFILE="$ROOT/docs/device_check.md"; fi
fi
LOGS="$(dirname "$OUTFILE")/device_check_logs"
mkdir -p "$LOGS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  PRESET=nano; PRESET_BIG=nano; VOCAB=(--vocab-size 64); SEQ=16; BIN=2; BIN_BIG=4; N=2; LEAN_CHUNK=8; ATTN_CHUNK=8
  BENCH_EXTRA=(--repeats 2 --outer-repeats 1 --ls-grid 2 --ls-batches 1 --no-breakdown)
  T_BENCH=300; T_BF16=300; T_COMPILE=300; T_TRAIN=300; T_DEVICES=300; T_FIRST=300; T_COMPILE_BIG=300
  P_MODEL=(--set model.preset=nano --set model.memory=auto); WS_STEPS=4; OUTER=2; VALSEQ=8
  T_PWS=300; T_PGN=300; T_PADAM=300; T_PMUON=300; T_CAND=300
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  PRESET=45m; PRESET_BIG=150m; VOCAB=(); SEQ=1024; BIN=32; BIN_BIG=128; N=122; LEAN_CHUNK=4096; ATTN_CHUNK=256
  BENCH_EXTRA=(--repeats 3 --outer-repeats 1 --no-breakdown)
  T_BENCH=130; T_BF16=200; T_COMPILE=120; T_TRAIN=80; T_DEVICES=150; T_FIRST=70; T_COMPILE_BIG=120
  P_MODEL=(); WS_STEPS=300; OUTER=3; VALSEQ=128
  T_PWS=100; T_PGN=200; T_PADAM=90; T_PMUON=90; T_CAND=200
fi
if [ -n "${STEP_TIMEOUT_S:-}" ]; then
  T_BENCH=$STEP_TIMEOUT_S; T_BF16=$STEP_TIMEOUT_S; T_COMPILE=$STEP_TIMEOUT_S; T_TRAIN=$STEP_TIMEOUT_S
  T_DEVICES=$STEP_TIMEOUT_S; T_FIRST=$STEP_TIMEOUT_S; T_COMPILE_BIG=$STEP_TIMEOUT_S
  T_PWS=$STEP_TIMEOUT_S; T_PGN=$STEP_TIMEOUT_S; T_PADAM=$STEP_TIMEOUT_S; T_PMUON=$STEP_TIMEOUT_S; T_CAND=$STEP_TIMEOUT_S
fi
PLAIN=(--model logits_chunk=0 --model attn_chunk=0 --model remat=false --model scan_layers=false)
LEAN=(--model logits_chunk=$LEAN_CHUNK --model attn_chunk=$ATTN_CHUNK --model remat=true --model scan_layers=true)

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# run_step NAME TIMEOUT_S CMD...: stdout -> $LOGS/NAME.out, stderr -> NAME.err, status -> NAME.status
run_step() {
  local name="$1" limit="$2"; shift 2
  if ! wanted "$name"; then echo "not selected" > "$LOGS/$name.status"; return; fi
  echo "[device_check] $name (timeout ${limit}s): $*" >&2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then echo "ok $dt" > "$LOGS/$name.status"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "timeout $dt" > "$LOGS/$name.status"
  else echo "failed(rc=$rc) $dt" > "$LOGS/$name.status"; fi
  echo "[device_check] $name: $(cat "$LOGS/$name.status")" >&2
}

# The paper's protocol, first (the most important numbers): the warm start, then three methods from it.
PROTO=("${P_MODEL[@]}" --set data.source=synthetic --set data.synthetic.vocab_size=64 --set data.synthetic.order=2
       --set data.synthetic.support=4 --set data.seq_len=$SEQ --set data.val_sequences=$VALSEQ
       --set train.eval_batch_size=$BIN --set train.progress=false)
rm -rf "$LOGS/proto"
run_step proto_warmstart "$T_PWS" "$PY" -m gn.cli train configs/paper_45m_warmstart.yaml --method adamw \
  --workdir "$LOGS/proto/warmstart" "${PROTO[@]}" --set train.steps=$WS_STEPS --set train.batch_size=$BIN \
  --set train.eval_every=$WS_STEPS --set train.checkpoint_every=$WS_STEPS
for m in gn adamw_lr3e-3 muon_lr1e-2; do
  case $m in gn) step=proto_gn; limit=$T_PGN ;; adamw*) step=proto_adamw; limit=$T_PADAM ;; *) step=proto_muon; limit=$T_PMUON ;; esac
  run_step "$step" "$limit" "$PY" -m gn.cli train configs/paper_45m.yaml --method "$m" --workdir "$LOGS/proto/$m" \
    "${PROTO[@]}" --set train.init_from="$LOGS/proto/warmstart" --set train.steps=$OUTER \
    --set train.batch_size=$((N * BIN)) --set train.grad_accum=$N --set train.eval_every=1 \
    --set train.checkpoint_every=1000 --set methods.gn.inner_steps=$N --set methods.gn.ls_batches=$N
done
run_step candidates "$T_CAND" "$PY" -m gn.bench.cli bench candidates --json --preset "$PRESET" "${VOCAB[@]}" \
  --inner-batch "$BIN" --seq-len "$SEQ" --inner-steps "$N" --repeats $([ "$TINY" = 1 ] && echo 2 || echo 5)

BENCH=("$PY" -m gn.bench.cli --json --preset "$PRESET" "${VOCAB[@]}" --inner-batch "$BIN" --seq-len "$SEQ"
       --inner-steps "$N" "${BENCH_EXTRA[@]}")
# Most important first: a step that runs out of the call's time loses only what comes after it.
COMPILE=("$PY" -m gn.bench.cli --json --compile-only "${VOCAB[@]}" --seq-len "$SEQ" --inner-steps "$N" "${LEAN[@]}")
run_step compile_45m "$T_COMPILE" "${COMPILE[@]}" --preset "$PRESET" --inner-batch "$BIN"
run_step bench_lean "$T_BF16" "${BENCH[@]}" "${LEAN[@]}" --compute-dtype bfloat16
run_step bench_f32 "$T_BENCH" "${BENCH[@]}" "${PLAIN[@]}"

# GN on the synthetic language (its vocabulary, 64, is below the preset's 32000, so the model keeps the
# paper's embedding and head). train_config PRESET N B_INNER STEPS > file
train_config() {
cat <<EOF
model:
  preset: $1
  compute_dtype: bfloat16
  logits_chunk: $LEAN_CHUNK
  attn_chunk: $ATTN_CHUNK
  remat: true
  scan_layers: true
data:
  source: synthetic
  seq_len: $SEQ
  val_sequences: $3
  synthetic: {vocab_size: 64, order: 2, support: 4}
train:
  steps: $4
  batch_size: $(($2 * $3))
  eval_every: $4
  eval_batch_size: $3
  checkpoint_every: 1000
  progress: false
methods:
  - {name: gn, inner_steps: $2, ls_batches: 2}
EOF
}
train_config "$PRESET" "$N" "$BIN" 3 > "$LOGS/train_config.yaml"
rm -rf "$LOGS/train_run" "$LOGS/first_150m_run"
run_step train "$T_TRAIN" "$PY" -m gn.cli train "$LOGS/train_config.yaml" --method gn --workdir "$LOGS/train_run"
train_config "$PRESET_BIG" 4 "$BIN_BIG" 1 > "$LOGS/first_150m_config.yaml"
run_step first_150m "$T_FIRST" "$PY" -m gn.cli train "$LOGS/first_150m_config.yaml" --method gn \
  --workdir "$LOGS/first_150m_run"
run_step compile_150m "$T_COMPILE_BIG" "${COMPILE[@]}" --preset "$PRESET_BIG" --inner-batch "$BIN_BIG"

if wanted devices; then
  NDEV=$(timeout 60 "$PY" -c "import jax; print(jax.device_count())" 2>/dev/null || echo "?")
  if [ "$NDEV" != "?" ] && [ "$NDEV" -gt 1 ] 2>/dev/null; then
    run_step devices "$T_DEVICES" "$PY" -m pytest -q -o addopts="" tests/test_sharding.py
  else
    echo "skipped ($NDEV device)" > "$LOGS/devices.status"
  fi
fi

"$PY" - "$LOGS" "$OUTFILE" "$TINY" <<'EOF'
import json, platform, sys, datetime
from pathlib import Path

logs, outfile, tiny = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"

def status(name):
    p = logs / f"{name}.status"
    return p.read_text().split() if p.exists() else ["missing"]

def load(name):
    try:
        return json.loads((logs / f"{name}.out").read_text())
    except (OSError, ValueError):
        return None

def ms(x): return "-" if x is None else f"{1e3 * x:,.1f} ms"
def sec(x): return "-" if x is None else f"{x:,.2f} s"
def gb(x):
    if x is None:
        return "-"
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.2f} MB"

def bench_numbers(r):
    if r is None:
        return "-"
    c = r.get("config", {})
    return (f"{c.get('compute_dtype') or c.get('dtype')} matmuls: AdamW {ms(r.get('adamw_step_s'))}, Muon {ms(r.get('muon_step_s'))}, "
            f"GN inner {ms(r.get('gn_inner_step_s'))} ({r.get('gn_inner_over_muon') or 0:.2f}x Muon), "
            f"layerwise {ms(r.get('gn_layerwise_inner_step_s'))}, outer {sec(r.get('outer_step_s'))}, "
            f"peak {gb(r.get('peak_bytes_in_use'))}")

def compile_numbers(r):
    if r is None:
        return "-"
    c = r["compiled"]
    parts = [f"{k} temp {gb(c[k].get('temp_bytes'))}" for k in ("value_and_grad", "gn_inner_step",
                                                                  "gn_layerwise_inner_step") if k in c]
    slowest = max((v.get("compile_s") or 0 for v in c.values()), default=0)
    return ", ".join(parts) + f"; slowest compile {slowest:.0f} s"

def train_numbers(run="train_run", what="outer"):
    p = logs / run / "metrics.jsonl"
    try:
        rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    except (OSError, ValueError):
        return "-"
    steps = [r for r in rows if "step_time_s" in r]
    if not steps:
        return "-"
    last = steps[-1]
    times = ", ".join(f"{r['step_time_s']:.2f}" for r in steps)
    loss = last.get("train_loss")
    return (f"{len(steps)} {what} steps, step times {times} s (first includes compile), "
            f"final train loss {loss:.4f}" if isinstance(loss, float) else f"{len(steps)} {what} steps, {times} s")

def devices_numbers():
    p = logs / "devices.out"
    return p.read_text().strip().splitlines()[-1] if p.exists() and p.read_text().strip() else "-"

size = "nano, b_inner 2, seq 16, N 2 (--tiny)" if tiny else "45m, b_inner 32, seq 1024, N 122"
lean = "logits_chunk, attn_chunk, remat, scan_layers"
def proto_numbers(run):
    d = logs / "proto" / run
    try:
        rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
        summ = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return "-"
    steps = [r for r in rows if "step_time_s" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    ema = [r["val_loss_ema"] for r in rows if "val_loss_ema" in r]
    times = ", ".join(f"{r['step_time_s']:.2f}" for r in steps[-4:])
    mem = summ.get("memory") or {}
    peak = summ.get("device_peak_bytes")
    alpha = ", ".join(f"{r['alpha']:.2f}" for r in steps if "alpha" in r)
    return (f"{len(steps)} steps, last step times {times} s; val {val[0]:.4f} -> {val[-1]:.4f}"
            + (f" (EMA {ema[-1]:.4f})" if ema else "") + (f"; α {alpha}" if alpha else "")
            + f"; memory {mem.get('chosen', '-')}" + (f", peak {gb(peak)}" if peak else "")
            + ("; DIVERGED" if summ.get("diverged") else ""))

def candidate_numbers():
    r = load("candidates")
    if r is None:
        return "-"
    return "; ".join(f"{k} {ms(v['step_s'])} ({v['over_plain']:.2f}x, grad rel {v['grad_rel']:.1e} vs {v['reference']})"
                     for k, v in r["candidates"].items())

proto = "nano (--tiny)" if tiny else "45m, N 122, b_inner 32, seq 1024"
rows = [
    ("proto_warmstart", f"configs/paper_45m_warmstart.yaml, adamw ({proto}, synthetic)", proto_numbers("warmstart")),
    ("proto_gn", f"configs/paper_45m.yaml gn from the warm start ({proto})", proto_numbers("gn")),
    ("proto_adamw", f"configs/paper_45m.yaml adamw_lr3e-3 from the warm start ({proto})", proto_numbers("adamw_lr3e-3")),
    ("proto_muon", f"configs/paper_45m.yaml muon_lr1e-2 from the warm start ({proto})", proto_numbers("muon_lr1e-2")),
    ("candidates", f"gn bench candidates: one GN inner step per option ({size})", candidate_numbers()),
    ("bench_f32", f"gn bench, float32, plain model ({size})", bench_numbers(load("bench_f32"))),
    ("bench_lean", f"gn bench, compute_dtype bfloat16, {lean} ({size})", bench_numbers(load("bench_lean"))),
    ("compile_45m", "gn bench --compile-only, " + ("nano b_inner 2 (--tiny)" if tiny else "45m, b_inner 32, seq 1024")
     + f", {lean}", compile_numbers(load("compile_45m"))),
    ("compile_150m", "gn bench --compile-only, " + ("nano b_inner 4 (--tiny)" if tiny else "150m, b_inner 128, seq 1024")
     + f", {lean}", compile_numbers(load("compile_150m"))),
    ("train", f"gn train gn, 3 outer steps, synthetic data, bf16, {lean} ({size})", train_numbers()),
    ("first_150m", "gn train gn, 1 outer step, " + ("nano (--tiny)" if tiny else "150m, b_inner 128, N 4")
     + f", bf16, {lean}; wall s = process start to exit", train_numbers("first_150m_run")),
    ("devices", "multi-device equality (tests/test_sharding.py)", devices_numbers()),
]
machine = "-"
for name in ("bench_f32", "bench_lean"):
    r = load(name)
    if r and r.get("machine"):
        m = r["machine"]
        machine = f"{m.get('backend')}, {m.get('cpu')}, jax {m.get('jax')}"
        break
lines = ["# Device check", "",
         f"`bash scripts/device_check.sh{' --tiny' if tiny else ''}`, "
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine}; "
         f"python {platform.python_version()}.", "",
         "| step | what | status | wall s | numbers |", "|---|---|---|---|---|"]
for name, what, numbers in rows:
    st = status(name)
    lines.append(f"| {name} | {what} | {st[0] if st[0] != 'skipped' else ' '.join(st)} | "
                 f"{st[1] if len(st) > 1 and st[0] != 'skipped' else '-'} | {numbers} |")
lines += ["", f"Logs and raw JSON: `{logs}`."]
outfile.write_text("\n".join(lines) + "\n")
print(outfile.read_text())
EOF
