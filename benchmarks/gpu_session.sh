#!/usr/bin/env bash
# One GPU lease, one command: the training-speed grid on a quiet GPU, then the real-data measurements of the open
# issues side by side on the same GPU, each resumable and each writing its results as it goes.
#
#   OUT=DIR bash benchmarks/gpu_session.sh [SECONDS]          # SECONDS: the whole budget (default 540)
#   SCALE=tiny OUT=DIR bash benchmarks/gpu_session.sh 900     # a dry run of every step at toy sizes (CPU)
#
# 1. benchmarks/train_speed.py: fp32 / bf16-mixed / channels_last / batch 512 / torch.compile (the default U-Net),
#    and DiT in bf16; nothing else runs meanwhile (REPA's encoder trains on the CPU).
# 2. At once, every job one process (one CPU thread each), cut at the deadline with what it has written:
#    - faster_training.py (issue 28): {unet, dit} x {baseline, dispersive, repa}, FD every EVAL steps;
#    - few_step.py (issue 29): EDM and rectified-flow teachers, cd, pd, reflow, ct, meanflow, shortcut;
#    - post-hoc EMA and guidance (issue 27): the default recipe (600 x 128) with snapshots, FD against EMA length;
#      the class-conditional recipe, FD against guidance scale for CFG, CFG on an interval and autoguidance, and
#      plain DDIM at the guided runs' network evaluations.
# Writes $OUT/results.tgz (every results file, table and log; no checkpoints) and $OUT/summary.txt.
set -u
BUDGET=${1:-540}
OUT=${OUT:-benchmarks/out/gpu_session}
START=$(date +%s)
R=benchmarks/out/gpu
LOGS=$R/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
CLF=src/diffusion_lab/metrics/weights/fashion_mnist_classifier.pt

if [ "${SCALE:-full}" = tiny ]; then
  SPEED=(--steps 2 --warmup 1 --rounds 1 data.batch_size=8)
  FT=(--steps 4 --eval-every 2 --num-samples 40 --batch-size 8); ENCODER_STEPS=4
  FS=(--teacher-steps 6 --student-steps 6 --batch-size 8 --num-samples 40 --reflow-pairs 16 --teacher-nfe 4)
  TRAIN=(trainer.max_steps=4 data.batch_size=8 model.dim=8 callbacks.posthoc_ema.every_n_steps=1)
  EMAS=(ema 0.05 0.1); GUIDE=step:2@0.05; SWEEP=(num_samples=20 batch_size=10 steps=4); SWEEP_WIDE=(num_samples=20 batch_size=10 steps=8)
  COMPILE=""
else
  SPEED=(--steps 10 --warmup 3 --rounds 2)
  FT=(--steps 1200 --eval-every 400 --num-samples 5000 --batch-size 128); ENCODER_STEPS=600
  FS=(--teacher-steps 1000 --student-steps 1000 --batch-size 128 --num-samples 5000 --reflow-pairs 4000 --teacher-nfe 10,20)
  TRAIN=(trainer.max_steps=600 callbacks.posthoc_ema.every_n_steps=50)
  EMAS=(ema 0.05 0.08 0.1 0.15 0.2); GUIDE=step:300@0.05; SWEEP=(num_samples=1000 steps=50); SWEEP_WIDE=(num_samples=1000 steps=100)
  COMPILE=--compile
fi
left() { echo $(( BUDGET - 25 - ($(date +%s) - START) )); }
note() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOGS/status"; }
T() { timeout "$(left)" "$@"; }  # a command cut at the deadline
job() {  # job NAME COMMAND...: runs until done or the deadline, logs to $LOGS/NAME.log (COMMAND may be a function)
  local name=$1; shift
  "$@" > "$LOGS/$name.log" 2>&1
  note "$name exit $?"
}
finish() {
  note "packing"
  timeout 60 $PY -c "import pathlib, faster_training, few_step
out = pathlib.Path('$R')
print(faster_training.table_and_plot(out / 'faster_training') if list(out.glob('faster_training/*/results.json')) else '')
print(few_step.table(out / 'few_step') if list(out.glob('few_step/*/results.json')) else '')" > "$LOGS/tables.log" 2>&1
  tar czf "$OUT/results.tgz" --exclude='*.ckpt' --exclude='*.pt' --exclude='*.npz' --exclude='posthoc_ema' "$R" 2>/dev/null
  { cat "$LOGS/status"; for f in "$LOGS"/*.log; do echo "== $f"; tail -n 15 "$f"; done
    for t in "$R"/*/table.md "$R"/*/*/table.md; do [ -f "$t" ] && { echo "== $t"; cat "$t"; }; done; } > "$OUT/summary.txt"
}
trap finish EXIT

note "$($PY -c 'import torch, lightning, hydra, torchmetrics; print("torch", torch.__version__, "lightning", lightning.__version__, "hydra", hydra.__version__, "torchmetrics", torchmetrics.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1 | tail -n 1)"

# 1. speed, alone on the GPU; REPA's encoder trains on the CPU meanwhile
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 job encoder T $PY -c "import argparse, pathlib, faster_training as f
print(f.train_encoder(argparse.Namespace(out=pathlib.Path('$R/faster_training'), seed=0, encoder_steps=$ENCODER_STEPS)))" &
ENCODER=$!
speed() { job "speed_$1" T $PY benchmarks/train_speed.py "${SPEED[@]}" "${@:2}"; }
speed unet_fp32 --precision 32-true
speed unet_bf16 --precision bf16-mixed
speed unet_bf16_channels_last --precision bf16-mixed channels_last=true
speed unet_bf16_b512 --precision bf16-mixed data.batch_size=512
speed dit_fp32 experiment=dit_fashion_mnist
speed dit_bf16 --precision bf16-mixed experiment=dit_fashion_mnist
if [ -n "$COMPILE" ]; then job speed_unet_bf16_b512_compile timeout 150 $PY benchmarks/train_speed.py "${SPEED[@]}" --precision bf16-mixed data.batch_size=512 --compile; fi
wait $ENCODER
ENC=$R/faster_training/encoder/checkpoints/last.ckpt

# 2. the measurements, side by side
for backbone in unet dit; do
  for variant in baseline dispersive repa; do
    job "ft_${backbone}_$variant" T $PY benchmarks/faster_training.py "${FT[@]}" --backbones $backbone --variants $variant \
      --encoder "$ENC" --out $R/faster_training &
  done
done
FSO=(--classifier $CLF "${FS[@]}" --out $R/few_step)
job fs_edm_cd T $PY benchmarks/few_step.py "${FSO[@]}" --students cd &
job fs_rf_reflow T $PY benchmarks/few_step.py "${FSO[@]}" --students reflow &
for student in ct meanflow shortcut; do job "fs_$student" T $PY benchmarks/few_step.py "${FSO[@]}" --students $student & done
job fs_pd T bash -c "until [ -f $R/few_step/edm/results.json ]; do sleep 5; done; $PY benchmarks/few_step.py ${FSO[*]} --students pd" &

sweep() { T $PY -m diffusion_lab.sweep "$@"; }  # one call per point set: a refused length stops no other
uncond() {
  T $PY train.py callbacks=[default,posthoc_ema] "${TRAIN[@]}" logger=csv paths.output_dir=$R/uncond \
    callbacks.sample_media=null callbacks.rich_progress_bar=null trainer.max_epochs=-1 || return
  for ema in "${EMAS[@]}"; do sweep $R/uncond out=$R/uncond/sweep "${SWEEP[@]}" sampler=ddim "emas=[$ema]"; done
  sweep $R/uncond out=$R/uncond/sweep_wide "${SWEEP_WIDE[@]}" sampler=ddim emas=[ema]
  sweep $R/uncond out=$R/uncond/sweep_auto "${SWEEP[@]}" sampler=ddim emas=[ema] "guidance_scales=[1.5,2]" \
    "intervals=[null,[0.3,5]]" guide=$GUIDE
}
cond() {
  T $PY train.py callbacks=[default,posthoc_ema] "${TRAIN[@]}" data.conditional=true logger=csv paths.output_dir=$R/cond \
    callbacks.sample_media=null callbacks.rich_progress_bar=null trainer.max_epochs=-1 || return
  sweep $R/cond out=$R/cond/sweep_cfg "${SWEEP[@]}" sampler=ddim emas=[ema] "guidance_scales=[1,1.5,2,3]" \
    "intervals=[null,[0.3,5]]"
  sweep $R/cond out=$R/cond/sweep_wide "${SWEEP_WIDE[@]}" sampler=ddim emas=[ema]
  sweep $R/cond out=$R/cond/sweep_auto "${SWEEP[@]}" sampler=ddim emas=[ema] "guidance_scales=[1.5,2,3]" \
    "intervals=[null,[0.3,5]]" guide=$GUIDE
}
job guidance_uncond uncond &
job guidance_cond cond &
wait
note "done"
